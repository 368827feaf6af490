"""The directory in Redis: generations, actors and subjects; subject writes; bulk loads.

An app's directory is a *generation*: its actors (``{dir:<app>}:<gen>:actors``), one key per subject, the sorted
set of subject ids and one set per look-up (``x:<kind>:<value>``); ``{dir:<app>}:current`` names the generation
in use. All of an app's directory keys share the app's hash tag, so a subject and its index entries change
together in one script, and a look-up's index and subjects sit on one node, even on a Cluster.

- Reads (:meth:`DirectoryStore.generations`, :meth:`~DirectoryStore.subject`, ...) take the generation to read.
- Writes of one subject (SCIM) are compare-and-set: :meth:`DirectoryStore.put_subject` replaces a subject only if
  it is still what the writer read, and :meth:`DirectoryStore.change` is the read-change-write loop around it.
- A load (:meth:`DirectoryStore.load_app`) writes a new generation beside the one in use and switches
  ``current`` to it last, so a reader sees all of the old directory or all of the new; the old generation is
  dropped a little later (:meth:`~DirectoryStore.drop_generations`: processes follow ``current`` within
  ``directory.refresh_seconds``). One load per app runs at a time (its lease, ``{dir:<app>}:loading``), and
  dropping spares its keys.

Every call raises :class:`~gateway.errors.StoreUnavailable` when Redis fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass

import orjson

from ..directory import Actors, AppDirectory, DirectoryError, Subject, new_incarnation
from .connection import Connection, Script
from .keys import Keys

LEASE_MS = 30_000  # a directory load's hold on its app, renewed by each batch: one that died lets go this late
CHANGE_ATTEMPTS = 5  # reads and writes of one subject before :meth:`DirectoryStore.change` gives up


class LoadUnderWay(DirectoryError):
    """Another load of the same app holds its lease."""


class Contended(Exception):
    """Another writer changed the subject between each read and write of :meth:`DirectoryStore.change`."""

    def __init__(self, app: str, subject_id: str) -> None:
        super().__init__(app, subject_id)
        self.app = app
        self.subject_id = subject_id


@dataclass(frozen=True)
class LoadSummary:
    """What one app's directory load did: subjects added, changed (any field) and removed, and how long it took."""

    app: str
    generation: str
    added: int
    changed: int
    removed: int
    subjects: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.app}: {self.subjects} subjects ({self.added} added, {self.changed} changed, "
                f"{self.removed} removed) in {self.seconds:.1f} s")  # fmt: skip


# Write a batch of subjects into a new generation and count, against the previous one, the added, changed and
# kept. ARGV: the app's key tag, the new generation, the previous one ("" when none), the lease's milliseconds,
# then per subject its id, JSON (without an incarnation), "1" if active ("" if not), a fresh incarnation, and the
# number of its index entries followed by each entry's kind and value. A subject keeps the incarnation it had in
# the previous generation unless it was absent there or comes back active from inactive (then the fresh one): a
# reload does not end live grants, a removal or a deactivation does for good. The incarnation is appended as the
# JSON's last key, where Subject.to_json puts it, so an unchanged subject's JSON is the same bytes.
# The load must still hold the app's lease (``loading`` = its generation; renewed here): {-2} when it lost it,
# {-1, id} for an id given twice. Every key is in the app's slot (KEYS[1]'s).
_LOAD = Script("""
local tag, gen, old = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', tag .. 'loading') ~= gen then return {-2} end
redis.call('PEXPIRE', tag .. 'loading', ARGV[4])
local new = tag .. gen .. ':'
if old ~= '' then old = tag .. old .. ':' end
local added, changed, kept = 0, 0, 0
local i = 5
while i <= #ARGV do
  local id, json, active, incarnation, entries = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  if redis.call('ZADD', new .. 'ids', 0, id) == 0 then return {-1, id} end
  local before = old ~= '' and redis.call('GET', old .. 's:' .. id)
  if before then
    local was = cjson.decode(before)
    if was.active ~= false or active == '' then incarnation = was.incarnation or '' end
  end
  if incarnation ~= '' then json = string.sub(json, 1, -2) .. ',"incarnation":"' .. incarnation .. '"}' end
  redis.call('SET', new .. 's:' .. id, json)
  for j = i + 5, i + 3 + 2 * entries, 2 do
    redis.call('SADD', new .. 'x:' .. ARGV[j] .. ':' .. ARGV[j + 1], id)
  end
  i = i + 5 + 2 * entries
  if before then
    kept = kept + 1
    if before ~= json then changed = changed + 1 end
  else
    added = added + 1
  end
end
return {added, changed, kept}
""")

# A load's last step, if it still holds the lease (ARGV: the tag, its generation, the actors' JSON, the previous
# generation or ""): its actors, then ``current``, then the lease goes. Returns the previous generation's number
# of subjects, or -1 when the lease was lost (nothing switched).
_SWITCH = Script("""
local tag, gen, old = ARGV[1], ARGV[2], ARGV[4]
if redis.call('GET', tag .. 'loading') ~= gen then return -1 end
redis.call('SET', tag .. gen .. ':actors', ARGV[3])
redis.call('SET', KEYS[1], gen)
redis.call('DEL', tag .. 'loading')
if old == '' then return 0 end
return redis.call('ZCARD', tag .. old .. ':ids')
""")

# Delete the keys in ARGV (after the tag, ARGV[1]) except those of the generation in use and of a load under way:
# checked here, in one atomic step, so a load that starts while old generations are being dropped keeps its keys.
_DROP = Script("""
local tag = ARGV[1]
local keep = {[redis.call('GET', KEYS[1]) or ''] = true, [redis.call('GET', tag .. 'loading') or ''] = true}
local n = 0
for i = 2, #ARGV do
  local gen = string.match(string.sub(ARGV[i], #tag + 1), '^([^:]+):')
  if gen and not keep[gen] then n = n + redis.call('UNLINK', ARGV[i]) end
end
return n
""")

# Let go of the lease if it is still this load's (ARGV[1]: the generation).
_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

# Replace one subject (KEYS[1]) and its index entries, if it still is what the caller read (ARGV[3], "" for none):
# ARGV[1] the generation's prefix, ARGV[2] the id, ARGV[4] the new JSON ("" deletes), then the count and the
# kind/value pairs of the entries to remove, then those to add. 1 done, 0 changed meanwhile (read it again).
_PUT_SUBJECT = Script("""
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[3] then return 0 end
local prefix, id = ARGV[1], ARGV[2]
local removed = tonumber(ARGV[5])
for j = 6, 5 + 2 * removed, 2 do
  redis.call('SREM', prefix .. 'x:' .. ARGV[j] .. ':' .. ARGV[j + 1], id)
end
if ARGV[4] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', prefix .. 'ids', id)
  return 1
end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', prefix .. 'ids', 0, id)
local at = 6 + 2 * removed
for j = at + 1, at + 2 * tonumber(ARGV[at]), 2 do
  redis.call('SADD', prefix .. 'x:' .. ARGV[j] .. ':' .. ARGV[j + 1], id)
end
return 1
""")


class DirectoryStore:
    """Each app's directory generations: reads, one-subject writes and bulk loads. ``lease_ms`` is how long a
    load holds its app after its last batch (:data:`LEASE_MS`)."""

    def __init__(self, connection: Connection, keys: Keys, *, lease_ms: int = LEASE_MS) -> None:
        self.connection = connection
        self.keys = keys
        self.lease_ms = lease_ms

    # -- reading --------------------------------------------------------------------------------------
    async def generations(self, apps: Iterable[str]) -> dict[str, str | None]:
        """Each app's directory generation in use (None: it has no directory), in one round trip."""
        names = list(apps)
        values = await self.connection.many(("GET", self.keys.current(n)) for n in names)
        return {n: None if v is None else bytes(v).decode() for n, v in zip(names, values, strict=True)}

    async def generation(self, app: str, *, start: bool = False) -> str | None:
        """The app's generation in use, read afresh (one round trip); with ``start``, an empty one is started
        when it has none (:meth:`start_generation`)."""
        generation = (await self.generations([app]))[app]
        if generation is None and start:
            generation = await self.start_generation(app)
        return generation

    async def actors(self, app: str, generation: str) -> tuple[Actors, str] | None:
        """The app's actors in ``generation`` and the digest of the source they were loaded from."""
        value = await self.connection.one("GET", self.keys.actors(app, generation))
        if value is None:
            return None
        raw = orjson.loads(value)
        return Actors.from_json(orjson.dumps(raw["actors"])), str(raw.get("source", ""))

    async def subject(self, app: str, generation: str, subject_id: str) -> Subject | None:
        """The subject ``subject_id`` in ``generation`` (None: absent); one GET."""
        value = await self.connection.one("GET", self.keys.subject(app, generation, subject_id))
        return None if value is None else Subject.from_json(value)

    async def current_subject(self, app: str, subject_id: str) -> Subject | None:
        """The subject in the app's generation in use, both read afresh (two round trips); None when the app has
        no directory or the subject is absent."""
        generation = await self.generation(app)
        return None if generation is None else await self.subject(app, generation, subject_id)

    async def subjects_by(self, app: str, generation: str, lookups: Iterable[tuple[str, str]]) -> list[Subject]:
        """The subjects that any of ``lookups`` (``(kind, value)``, see :meth:`Subject.index`) finds: two round
        trips, the index's ids and then their subjects."""
        keys = [self.keys.index(app, generation, kind, value) for kind, value in lookups]
        ids = await self.connection.one("SUNION", *keys)
        if not ids:
            return []
        names = (self.keys.subject(app, generation, bytes(i).decode()) for i in sorted(ids))
        values = await self.connection.one("MGET", *names)
        return [Subject.from_json(v) for v in values if v is not None]

    async def subject_page(self, app: str, generation: str, start: int, count: int) -> tuple[int, list[Subject]]:
        """How many subjects the app has, and ``count`` of them from the ``start``-th (0-based), ordered by id."""
        key = self.keys.subject_ids(app, generation)
        pipeline = self.connection.pipeline
        async with self.connection.call():
            total = pipeline.submit("ZCARD", key)
            ids = await pipeline.submit("ZRANGE", key, start, start + count - 1) if count > 0 else []
            names = (self.keys.subject(app, generation, bytes(i).decode()) for i in ids)
            values = await pipeline.submit("MGET", *names) if ids else []
            total = await total
        return int(total), [Subject.from_json(v) for v in values if v is not None]

    # -- one subject at a time ------------------------------------------------------------------------
    async def start_generation(self, app: str) -> str:
        """The app's generation in use, starting an empty one if it has none (its first subject comes by SCIM)."""
        generation = secrets.token_hex(8)
        actors = orjson.dumps({"actors": orjson.loads(Actors().to_json()), "source": ""})
        redis = self.connection.redis
        async with self.connection.call():
            await redis.set(self.keys.actors(app, generation), actors)
            if await redis.set(self.keys.current(app), generation, nx=True):
                return generation
        found = (await self.generations([app]))[app]  # another writer started one first
        assert found is not None
        return found

    async def put_subject(self, app: str, generation: str, was: Subject | None, subject: Subject | None) -> bool:
        """Make the subject ``was`` (None: absent) into ``subject`` (None: delete it), with its index entries, in
        one atomic step; False when it was no longer ``was`` (another writer came first: read it again)."""
        subject_id = (subject or was).id  # type: ignore[union-attr]
        removed = was.index() if was is not None else []
        added = subject.index() if subject is not None else []
        args: list[str | bytes] = [
            self.keys.generation_prefix(app, generation), subject_id, was.to_json() if was else b"",
            subject.to_json() if subject else b"", str(len(removed)), *(x for entry in removed for x in entry),
            str(len(added)), *(x for entry in added for x in entry),
        ]  # fmt: skip
        key = self.keys.subject(app, generation, subject_id)
        return bool(await self.connection.script(_PUT_SUBJECT, key, *args))

    async def change(
        self,
        app: str,
        subject_id: str,
        fn: Callable[[Subject | None], Awaitable[Subject | None]],
        attempts: int = CHANGE_ATTEMPTS,
    ) -> Subject | None:
        """Read the subject in the generation in use (None: absent), ask ``fn`` what it becomes (None: delete
        it) and write that with :meth:`put_subject`; when another writer came in between, read and ask again, at
        most ``attempts`` times, then raise :class:`Contended`. What ``fn`` raises ends the change, nothing
        written. Returns what was written.

        Each attempt is four round trips: the generation and the subject, then the generation again (a write
        never lands in a generation a load has replaced meanwhile) and the compare-and-set script.
        """
        for _ in range(attempts):
            was = await self.current_subject(app, subject_id)
            subject = await fn(was)
            if was is None and subject is None:
                return None  # nothing to delete
            generation = await self.generation(app)
            if generation is not None and await self.put_subject(app, generation, was, subject):
                return subject
        raise Contended(app, subject_id)

    # -- loading --------------------------------------------------------------------------------------
    async def load_app(
        self,
        directory: AppDirectory,
        *,
        source: str = "",
        batch: int = 1000,
        progress: Callable[[int], object] | None = None,
    ) -> LoadSummary:
        """Write ``directory`` as a new generation of its app, in batches (constant memory, each batch one
        script), then make it the one in use; the previous generation stays for :meth:`drop_generations`.

        One load per app at a time: it holds the app's lease (``loading``, renewed by each batch, expiring
        ``lease_ms`` after the last). A subject absent from ``directory`` is gone once this returns. A load
        that fails before the end changes nothing in use (its partial generation is dropped by the next load).
        Raises LoadUnderWay, DirectoryError (a bad or duplicate subject, a lost lease: nothing switched) or
        StoreUnavailable.
        """
        app, started = directory.app, time.monotonic()
        lease, generation = self.keys.loading(app), secrets.token_hex(8)
        async with self.connection.call():
            if not await self.connection.redis.set(lease, generation, nx=True, px=self.lease_ms):
                raise LoadUnderWay(f"apps.{app}: another load of this app is under way (one that died lets go "
                                   f"within {self.lease_ms // 1000} s); nothing was loaded")  # fmt: skip
        try:
            return await self._load(directory, generation, source, batch, progress, started)
        except BaseException:
            with suppress(Exception):
                await self.connection.script(_RELEASE, lease, generation)
            raise

    async def _load(
        self,
        directory: AppDirectory,
        generation: str,
        source: str,
        batch: int,
        progress: Callable[[int], object] | None,
        started: float,
    ) -> LoadSummary:
        app = directory.app
        tag, current = self.keys.directory_tag(app), self.keys.current(app)
        lost = DirectoryError(f"apps.{app}: the load stalled past {self.lease_ms // 1000} s and another took "
                              "over; nothing was switched")  # fmt: skip
        previous = (await self.generations([app]))[app] or ""
        added = changed = kept = 0
        pending: list[Subject] = []

        async def flush() -> None:
            # One script per batch writes its subjects and their index entries and compares them with the
            # previous generation's: a million subjects are a thousand commands, not five million.
            nonlocal added, changed, kept
            args: list[str | bytes] = [tag, generation, previous, str(self.lease_ms)]
            for subject in pending:
                index = subject.index()
                json = dataclasses.replace(subject, incarnation=None).to_json()
                args += [subject.id, json, "1" if subject.active else "", new_incarnation(), str(len(index))]
                for kind, value in index:
                    args += [kind, value]
            result = await self.connection.script(_LOAD, current, *args)
            if int(result[0]) == -2:
                raise lost
            if int(result[0]) == -1:
                raise DirectoryError(f"apps.{app}: subject {bytes(result[1]).decode()!r} is given twice")
            added, changed, kept = added + int(result[0]), changed + int(result[1]), kept + int(result[2])
            if progress is not None:
                progress(len(pending))
            pending.clear()
            await asyncio.sleep(0)  # a load inside a serving process lets requests in between batches

        for subject in directory.subjects:
            pending.append(subject)
            if len(pending) >= batch:
                await flush()
        await flush()
        actors = orjson.dumps({"actors": orjson.loads(directory.actors.to_json()), "source": source})
        before = await self.connection.script(_SWITCH, current, tag, generation, actors, previous)
        if int(before) < 0:
            raise lost
        return LoadSummary(app, generation, added, changed, int(before) - kept, added + kept,
                           time.monotonic() - started)  # fmt: skip

    async def drop_generations(self, app: str) -> int:
        """Delete every generation of the app's directory but the one in use and a load's under way (old
        ones, and what loads that died midway left); returns how many keys went."""
        dropped = 0
        doomed: list[bytes] = []
        async for key in self.connection.scan_near(self.keys.current(app), self.keys.generation_keys(app)):
            doomed.append(key)
            if len(doomed) >= 1000:
                dropped += await self._drop(app, doomed)
        return dropped + await self._drop(app, doomed)

    async def _drop(self, app: str, keys: list[bytes]) -> int:
        if not keys:
            return 0
        tag = self.keys.directory_tag(app)
        dropped = int(await self.connection.script(_DROP, self.keys.current(app), tag, *keys))
        keys.clear()
        return dropped

    async def load_directory(self, apps: Mapping[str, AppDirectory]) -> dict[str, LoadSummary]:
        """Load each app (:meth:`load_app`) and drop its older generations at once: for tests and set-up,
        where no process is reading the directory yet."""
        summaries = {}
        for name, directory in apps.items():
            summaries[name] = await self.load_app(directory)
            await self.drop_generations(name)
        return summaries
