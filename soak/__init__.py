"""``make soak``: the gateway under a steady mixed load for ``SOAK_SECONDS`` (default 3600) while its app misbehaves,
its clients misbehave, Redis fails over and a gateway process dies — then what was lost, what was redeemed twice,
which 5xx no fault explains, and whether memory or file descriptors grew.

Every part is a real process on 127.0.0.1, on free ports::

    cluster.py     the processes: Redis (a primary, a replica, three Sentinels), two gateways, nginx in edge
                   mode in front, the downstream app; their configs; /proc readings of the gateways
    app.py         the downstream app (its own process): normal endpoints, faults on command, and the record
                   of every assertion it received (the judge of "exactly once")
    driver.py      the traffic: mints in every dialect and native, redemptions by every carrier, sessions,
                   pass-through, revocations, SCIM, directory loads, garbage
    faults.py      the schedule of faults (app, client, Redis, gateway) and the check of each one's outcome
    ledger.py      the accounting: requests by kind and outcome, grants, 5xx and their causes, latency windows,
                   growth of RSS and fds (pure: tests/test_soak.py tests it)
    report.py      soak-results.json, soak-results.txt and the plots in docs/soak/
"""
