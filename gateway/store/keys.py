"""Every Redis key the gateway uses, built from the configured prefix in this one place.

Keys (all under the prefix; ``{...}`` is a Redis Cluster hash tag)::

    grant:{<grant id>}                  a live grant, JSON, PX = grant TTL          SET NX PX / GETDEL
    used:{<grant id>}                   tombstone of a redeemed grant (reuse alarm)  SET PX, in the redeem script
    {grants:<app>}:live                 the app's grant ids by expiry (revocation)   ZADD (shared), ZSCAN, trimmed
    {grants:<app>}:pair:<h>             the newest grant of an actor and a subject   SET PX (apps that supersede)
    {dir:<app>}:current                 the app's directory generation in use        SET (a load's last step), GET
    {dir:<app>}:loading                 the generation a load is writing (its lease)  SET NX PX, renewed per batch
    {dir:<app>}:<gen>:actors            principals and resellers, JSON, small        SET, GET
    {dir:<app>}:<gen>:s:<id>            one subject, JSON                            SET, GET / MGET
    {dir:<app>}:<gen>:ids               every subject id (sorted set, score 0)       ZADD, ZRANGE, ZCARD
    {dir:<app>}:<gen>:x:<kind>:<value>  ids of the subjects a look-up finds (set)    SADD, SUNION
    audit                               bounded stream of mint/redeem events         XADD MAXLEN ~
    fail:<kind>:<fingerprint>           failed-credential counters                   INCR + EXPIRE
    session:{<session id>}              an impersonation session, hash, PX <= cap     HSET / one script per request
    {sessions:<app>}:index              the app's sessions: id -> who and when        HSET, HSCAN, HDEL (admin, sweep)

A grant and its tombstone share a hash tag, so the redeem script touches one slot. All of an app's directory
keys share the app's tag (:meth:`Keys.directory_tag`): the directory scripts build the keys of a generation from
that tag the same way the methods here do, so a subject and its index entries change together in one script,
even on a Cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The key names under ``prefix``; pure functions of their arguments, no Redis access."""

    prefix: str

    # -- grants ---------------------------------------------------------------------------------------
    def grant(self, grant_id: str) -> str:
        return f"{self.prefix}grant:{{{grant_id}}}"

    def tombstone(self, grant_id: str) -> str:
        return f"{self.prefix}used:{{{grant_id}}}"

    def live(self, app: str) -> str:
        return f"{self.prefix}{{grants:{app}}}:live"

    def pair(self, app: str, actor: str, subject: str) -> str:
        pair = hashlib.sha256(f"{actor}\0{subject}".encode()).hexdigest()[:32]
        return f"{self.prefix}{{grants:{app}}}:pair:{pair}"

    # -- directory ------------------------------------------------------------------------------------
    def directory_tag(self, app: str) -> str:
        """What every directory key of the app starts with (its hash tag included)."""
        return f"{self.prefix}{{dir:{app}}}:"

    def current(self, app: str) -> str:
        return self.directory_tag(app) + "current"

    def loading(self, app: str) -> str:
        return self.directory_tag(app) + "loading"

    def generation_prefix(self, app: str, generation: str) -> str:
        """What every key of one generation of an app's directory starts with."""
        return f"{self.directory_tag(app)}{generation}:"

    def generation_keys(self, app: str) -> str:
        """A SCAN MATCH pattern for the keys of every generation of the app's directory (not ``current`` or
        ``loading``, which hold no ``:`` after the tag)."""
        return _glob_escape(self.directory_tag(app)) + "*:*"

    def actors(self, app: str, generation: str) -> str:
        return self.generation_prefix(app, generation) + "actors"

    def subject(self, app: str, generation: str, subject_id: str) -> str:
        return self.generation_prefix(app, generation) + "s:" + subject_id

    def subject_ids(self, app: str, generation: str) -> str:
        return self.generation_prefix(app, generation) + "ids"

    def index(self, app: str, generation: str, kind: str, value: str) -> str:
        return self.generation_prefix(app, generation) + f"x:{kind}:{value}"

    # -- sessions -------------------------------------------------------------------------------------
    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{{{session_id}}}"

    def session_index(self, app: str) -> str:
        return f"{self.prefix}{{sessions:{app}}}:index"

    # -- events ---------------------------------------------------------------------------------------
    @property
    def audit(self) -> str:
        return f"{self.prefix}audit"

    def failure(self, kind: str, fingerprint: str) -> str:
        return f"{self.prefix}fail:{kind}:{fingerprint}"


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
