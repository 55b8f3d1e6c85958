"""Cached demo stages: each writes one folder and, last, a marker with its cache key and result.

A stage whose marker holds the same key is skipped; a folder without a marker (a run that was
killed) or with another key (the settings changed) is deleted and the stage runs again. The key
of a stage includes the keys of the stages it reads from, so a new seed re-runs everything
downstream of it and nothing upstream.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["StageRunner", "StageResult", "fingerprint"]

MARKER = ".demo_stage.json"


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageResult:
    folder: Path
    key: str
    result: dict
    wall_s: float
    cached: bool


@dataclass
class StageRunner:
    """Numbers and announces stages, caches them under `root`, and keeps their wall times."""
    root: Path
    total: int
    done: int = 0
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))
    results: dict[str, StageResult] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        self.log(f"[demo] {msg}")

    def run(self, name: str, folder: Path, inputs: dict, fn: Callable[[Path], dict],
            deps: list[StageResult] = ()) -> StageResult:
        """Run `fn(folder) -> result dict` unless a finished run with the same inputs is cached."""
        self.done += 1
        key = fingerprint({"inputs": inputs, "deps": [d.key for d in deps]})
        marker = folder / MARKER
        head = f"[{self.done}/{self.total}] {name}"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                self.say(f"{head}: cached in {folder} ({saved['wall_s']:.0f} s when it ran)")
                res = StageResult(folder, key, saved["result"], saved["wall_s"], cached=True)
                self.results[name] = res
                return res
            self.say(f"{head}: settings changed since the cached run; running it again")
        if folder.resolve().parent != self.root.resolve() and self.root.resolve() not in folder.resolve().parents:
            raise ValueError(f"stage folder {folder} is outside the demo folder {self.root}")
        if folder.exists():
            shutil.rmtree(folder)  # leftovers of a killed or outdated run: never mix two runs' files
        folder.mkdir(parents=True)
        self.say(f"{head} ...")
        sys.stderr.flush()
        start = time.perf_counter()
        result = fn(folder)
        wall = time.perf_counter() - start
        tmp = folder / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result, "wall_s": wall, "inputs": inputs}, indent=2,
                                  default=str))
        tmp.replace(marker)  # written last: its presence means the stage finished
        res = StageResult(folder, key, result, wall, cached=False)
        self.results[name] = res
        return res
