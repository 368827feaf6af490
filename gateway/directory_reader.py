"""The directory as one gateway process reads it (DESIGN §11): actors cached, subjects looked up in the store.

The values it returns (:class:`~gateway.directory.Actors`, :class:`~gateway.directory.Subject`) and the file's
parsing live in :mod:`gateway.directory`; the store's keys in :mod:`gateway.store`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from .directory import Actors, AppDirectory, Subject, load_directory_file, source_digest
from .errors import StoreUnavailable
from .store import LoadSummary, LoadUnderWay, Store

log = structlog.get_logger("gateway")


class DirectoryReader:
    """The directory as this process reads it.

    Each app's actors (principals and resellers: few) are cached with the generation they come from, and
    followed within ``directory.refresh_seconds`` of a load made by any process. Subjects (possibly
    millions) are looked up in the store, in the generation this process follows, one request at a time:
    the process's memory does not grow with them, and a load never stops it (the new generation is written
    beside the one in use, then switched to).

    When the store has no directory for an app (Redis restarted empty, a flush) and a directory file is
    configured, the file is loaded again, so the gateway heals without a restart.
    """

    def __init__(self, store: Store, apps: Sequence[str], file: Path | None, refresh_seconds: float = 1.0) -> None:
        self.store = store
        self.apps = list(apps)
        self.file = file
        self.grace_seconds = 2 * refresh_seconds + 1  # before a replaced generation is dropped
        self._current: dict[str, tuple[str, Actors, str]] = {}  # app -> (generation, actors, source digest)
        self._read = False
        self._lock = asyncio.Lock()
        self._drops: set[asyncio.Task[None]] = set()

    def actors(self, app: str) -> Actors:
        """The app's principals and resellers (none if it has no directory); StoreUnavailable until read once."""
        if not self._read:
            raise StoreUnavailable()
        found = self._current.get(app)
        return _NO_ACTORS if found is None else found[1]

    async def subject(self, app: str, subject_id: str) -> Subject | None:
        generation = self._generation(app)
        found = None if generation is None else await self.store.subject(app, generation, subject_id)
        if found is None and await self._moved(app, generation):  # a load this process has not followed yet
            return await self.subject(app, subject_id)
        return found

    async def subjects_by(self, app: str, *lookups: tuple[str, str]) -> list[Subject]:
        generation = self._generation(app)
        found = [] if generation is None else await self.store.subjects_by(app, generation, lookups)
        if not found and await self._moved(app, generation):
            return await self.subjects_by(app, *lookups)
        return found

    async def _moved(self, app: str, generation: str | None) -> bool:
        """After a miss: whether the app's generation moved since this process last looked (it then follows it)."""
        current = (await self.store.generations([app]))[app]
        if current is None or current == generation:
            return False
        found = await self.store.actors(app, current)
        if found is None:
            return False
        self._current[app] = (current, *found)
        return True

    def _generation(self, app: str) -> str | None:
        if not self._read:
            raise StoreUnavailable()
        found = self._current.get(app)
        return None if found is None else found[0]

    async def refresh(self, *, load_file: bool = False) -> None:
        """Follow the generation each app's directory is in; ``load_file`` (start-up) loads the directory file
        first, for the apps whose store content did not come from the same file."""
        async with self._lock:
            generations = await self.store.generations(self.apps)
            if self.file is not None and (load_file or any(g is None for g in generations.values())):
                await self._load_file(generations)
                generations = await self.store.generations(self.apps)
            for app, generation in generations.items():
                if generation is None:
                    self._current.pop(app, None)
                elif self._current.get(app, ("",))[0] != generation:
                    found = await self.store.actors(app, generation)
                    if found is not None:
                        self._current[app] = (generation, *found)
            self._read = True

    async def _load_file(self, generations: Mapping[str, str | None]) -> None:
        assert self.file is not None
        for name, directory in load_directory_file(self.file).items():
            if name not in generations:
                log.warning("directory_app_unknown", app=name, file=str(self.file))
                continue
            source = source_digest(directory)
            generation = generations[name]
            found = None if generation is None else await self.store.actors(name, generation)
            if found is not None and found[1] == source:
                continue  # already loaded from this very file
            summary = await self._load_app(directory, source, generation)
            if summary is None:
                continue
            log.info("directory_loaded", file=str(self.file), app=name, generation=summary.generation,
                     subjects=summary.subjects, added=summary.added, changed=summary.changed,
                     removed=summary.removed, seconds=round(summary.seconds, 2))  # fmt: skip
            task = asyncio.create_task(self._drop_later(name))
            self._drops.add(task)
            task.add_done_callback(self._drops.discard)

    async def _load_app(self, directory: AppDirectory, source: str, generation: str | None) -> LoadSummary | None:
        """Load one app from the file, unless another process is loading it: then follow that load (once it is
        done, when the app had no directory yet, so this process never answers as if it had no actors)."""
        app = directory.app
        while True:
            try:  # small batches: this process serves requests between them
                return await self.store.load_app(directory, source=source, batch=200)
            except LoadUnderWay:
                if generation is not None:
                    log.info("directory_load_skipped", file=str(self.file), app=app, reason="another load under way")
                    return None
            await asyncio.sleep(0.1)
            if (await self.store.generations([app]))[app] is not None:
                return None  # the other process's load is done

    async def _drop_later(self, app: str) -> None:
        """Drop the replaced generation once every process has had time to follow the new one."""
        await asyncio.sleep(self.grace_seconds)
        try:
            await self.store.drop_generations(app)
        except StoreUnavailable:
            log.warning("directory_drop_failed", app=app, reason="store unavailable")  # the next load drops it

    async def close(self) -> None:
        for task in list(self._drops):
            task.cancel()
        await asyncio.gather(*self._drops, return_exceptions=True)


_NO_ACTORS = Actors()
