"""The directory at scale: generated directory files, and a probe that times requests while a load runs.

``write_directory`` writes a directory YAML whose ``control-panel`` app has the demo's actors and ``count``
subjects in a JSON Lines file beside it, the demo's seed account (505) among them, so that the bench's mint
request keeps working whatever the size.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

SEED = {"id": "505", "email": "example@activeplatform.com", "reseller": 1}


def write_directory(folder: Path, demo: Path, count: int) -> Path:
    """``folder/directory-<count>.yaml`` and its ``subjects-<count>.jsonl``: ``count`` subjects in all."""
    actors = {k: v for k, v in yaml.safe_load(demo.read_text())["apps"]["control-panel"].items() if k != "subjects"}
    subjects = folder / f"subjects-{count}.jsonl"
    with subjects.open("wb") as out:
        out.write(orjson.dumps(SEED) + b"\n")
        for n in range(count - 1):
            out.write(orjson.dumps({"id": str(1_000_000 + n), "email": f"user{n}@example.com", "reseller": 1,
                                    "name": f"User {n}"}) + b"\n")  # fmt: skip
    path = folder / f"directory-{count}.yaml"
    path.write_text(yaml.safe_dump({"apps": {"control-panel": {**actors, "subjects_file": subjects.name}}}))
    return path


@dataclass
class Probe:
    """GETs ``url`` (with ``headers``) every ``every`` seconds on a thread of its own, timing each answer."""

    url: str
    headers: dict[str, str]
    every: float = 0.01
    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Probe:
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, headers=self.headers), timeout=5) as got:
                    got.read()
                    ok = got.status == 200
            except OSError:
                ok = False
            took = time.perf_counter() - started
            self.latencies_ms.append(took * 1000)
            self.failures += not ok
            self._stop.wait(max(0.0, self.every - took))
