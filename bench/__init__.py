"""``make bench``: the gateway against the floors it is built from, one case at a time, under one load.

Every server runs as its own process on 127.0.0.1 and is loaded by ``wrk`` (32 connections, 2 threads)::

    upstream.py   the minimal downstream app every proxying case forwards to
    floors.py     bare aiohttp servers: hello, mint (SET NX PX), redeem (GETDEL + forward), proxy
    server.py     the gateway as ``serve`` runs it, with a counter of Redis round trips on a side port
    load.py       running wrk and reading the one JSON line its Lua ``done()`` prints
    processes.py  starting, awaiting and stopping the processes (redis-server included)
    sessions.py   a small aiohttp client that starts impersonation sessions (mint, redeem) and ends them
    run.py        the cases, a floor and its case alternately in rounds, and the Redis and memory figures
    report.py     the ratios (medians of the rounds, and their spread), the targets, the table, the JSON
    wrk/*.lua     the request scripts
"""
