"""What keeps a serving process's memory flat over hours (found by ``make soak``: docs/soak.md, finding 6)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc

from gateway import sessions
from gateway.core import Grant

# Exceptions whose tracebacks hold their frames, which hold the exceptions: the cycles the libraries make when a
# Redis connection is refused or a request head is too long. 20,000 of them are 60,000 tracked objects, more
# than the young generation held before a collection under the old threshold (50,000).
_CYCLES = textwrap.dedent(
    """
    import gc
    from gateway.cli import collect_often

    class Refused(ConnectionError):
        pass

    def refused():
        try:
            raise Refused("connection refused")
        except Refused as exc:
            kept = exc  # the frame holds the exception, whose traceback holds the frame
            return kept.args

    collect_often()
    most = 0
    for i in range(20_000):
        refused()
        if i % 1_000 == 999:
            most = max(most, sum(1 for o in gc.get_objects() if type(o) is Refused))
    print(most)
    """
)


def test_a_serving_process_collects_exception_cycles_before_they_pile_up() -> None:
    done = subprocess.run([sys.executable, "-c", _CYCLES], capture_output=True, text=True, timeout=120, check=True)
    most = int(done.stdout)
    assert 0 < most <= 2_500, f"{most} unreachable exceptions were alive at once"


def _grant(i: int) -> Grant:
    return Grant(
        id=f"{i:032x}", app="switch", dialect="native", subject=f"customer-{i}@example.com",
        actor="support-agent@example.com", role="support", actor_key=f"{i:016x}", issued_at=1_700_000_000_000 + i,
        expires_at=1_700_000_060_000 + i, email=f"customer-{i}@example.com", reason="ticket 1234", mode="read_only",
    )  # fmt: skip


def test_the_sessions_grant_cache_is_bounded_in_memory() -> None:
    """Every request of a session reads its grant: decoded once per process, for the busiest sessions only (the
    cache of 4,096 grew RSS by ~20 MiB as a gateway met new sessions, over the soak's first 40 minutes)."""
    stored = [(g.id, g.to_json()) for g in map(_grant, range(5_000))]
    sessions._grant.cache_clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for grant_id, data in stored:
            assert sessions._grant(grant_id, data).id == grant_id
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        sessions._grant.cache_clear()
    assert held < 2 * 1024 * 1024, f"the grant cache holds {held} bytes after 5,000 sessions"
    again = sessions._grant(*stored[-1])
    assert sessions._grant(*stored[-1]) is again  # a busy session's grant is decoded once
