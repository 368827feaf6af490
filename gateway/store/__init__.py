"""Every Redis key and command the gateway uses, one module per concept:

- :mod:`~gateway.store.connection`: :func:`connect` (embedded, plain, Sentinel, Cluster), the auto-pipeline,
  bounded calls and scripts, Redis failures as :class:`~gateway.errors.StoreUnavailable`;
- :mod:`~gateway.store.keys`: every key, built from the prefix (the key table is there);
- :mod:`~gateway.store.grants`: grants, their tombstones and each app's live index (mint, redeem, revoke);
- :mod:`~gateway.store.directory`: directory generations, subject reads and writes, bulk loads;
- :mod:`~gateway.store.events`: the audit stream and the failed-credential counters;
- :mod:`~gateway.store.sessions`: impersonation sessions and each app's session index.

:class:`Store` puts the parts together over one connection and offers each part's operations under their
own names, so callers hold one object. Only this package touches the Redis client.
"""

from __future__ import annotations

from ..config import StoreConfig
from .connection import AnyRedis, Connection, connect, redacted, unreachable
from .directory import LEASE_MS, Contended, DirectoryStore, LoadSummary, LoadUnderWay
from .events import EventStore
from .grants import Consumed, GrantStore, Pair
from .keys import Keys
from .sessions import Resumed, SessionStore

__all__ = [
    "AnyRedis",
    "Consumed",
    "Contended",
    "LoadSummary",
    "LoadUnderWay",
    "Pair",
    "Resumed",
    "Store",
    "connect",
    "redacted",
    "unreachable",
]


class Store:
    """The gateway's Redis operations over one client: :attr:`grant_store`, :attr:`directory_store` and
    :attr:`event_store`, sharing :attr:`connection` and :attr:`keys`. The hot operations (mint, redeem, audit,
    failure counters) share auto-pipelined round trips with concurrent requests; each is one round trip at most.

    ``timeout`` bounds each call (and a half); ``lease_ms`` is how long a directory load holds its app.
    """

    def __init__(self, redis: AnyRedis, prefix: str, timeout: float = 1.0, *, lease_ms: int = LEASE_MS) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.connection = connection = Connection(redis, timeout)
        self.keys = keys = Keys(prefix)
        self.event_store = events = EventStore(connection, keys)
        self.grant_store = grants = GrantStore(connection, keys, events)
        self.directory_store = directory = DirectoryStore(connection, keys, lease_ms=lease_ms)
        self.session_store = SessionStore(connection, keys, events)

        self.ping = connection.ping
        self.close = connection.close

        # keys
        self.grant_key = keys.grant
        self.tombstone_key = keys.tombstone
        self.live_key = keys.live
        self.pair_key = keys.pair
        self.current_key = keys.current
        self.generation_prefix = keys.generation_prefix
        self.actors_key = keys.actors
        self.subject_key = keys.subject
        self.subject_ids_key = keys.subject_ids
        self.index_key = keys.index
        self.audit_key = keys.audit
        self.failure_key = keys.failure

        # grants
        self.put_grants = grants.put_grants
        self.consume = grants.consume
        self.live = grants.live
        self.newest = grants.newest
        self.grants = grants.grants
        self.revoke = grants.revoke
        self.delete_grants = grants.delete_grants
        self.live_grants = grants.live_grants
        self.trim_live = grants.trim_live
        self.unindex = grants.unindex

        # events
        self.append_audit = events.append_audit
        self.append_audits = events.append_audits
        self.latest_audit = events.latest_audit
        self.read_audit = events.read_audit
        self.record_failure = events.record_failure

        # directory
        self.generations = directory.generations
        self.generation = directory.generation
        self.actors = directory.actors
        self.subject = directory.subject
        self.current_subject = directory.current_subject
        self.subjects_by = directory.subjects_by
        self.subject_page = directory.subject_page
        self.start_generation = directory.start_generation
        self.put_subject = directory.put_subject
        self.change = directory.change
        self.load_app = directory.load_app
        self.drop_generations = directory.drop_generations
        self.load_directory = directory.load_directory

    @classmethod
    def open(cls, config: StoreConfig) -> Store:
        """A store on a new client for ``config`` (:func:`connect`); :meth:`close` closes that client."""
        return cls(connect(config.url, config.timeout_seconds), config.prefix, config.timeout_seconds)

    @property
    def redis(self) -> AnyRedis:
        """The Redis client, for tests and tools that look at Redis itself; the gateway's code goes through the
        operations above."""
        return self.connection.redis
