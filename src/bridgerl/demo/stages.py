"""Cached demo stages: each writes one folder and, last, a marker with its cache key and result.

A stage whose marker holds the same key is skipped; a folder without a marker (a run that was
killed) or with another key (the settings changed) is deleted and the stage runs again. The key
of a stage includes the keys of the stages it reads from, so a new seed re-runs everything
downstream of it and nothing upstream.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["Stage", "StageRunner", "StageResult", "fingerprint"]

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
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)
    _pool_jobs: int = field(default=0, repr=False)

    def __enter__(self) -> "StageRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (run_many keeps them between calls: each costs a torch import)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _workers(self, jobs: int) -> ProcessPoolExecutor:
        if self._pool is not None and self._pool_jobs != jobs:
            self.close()
        if self._pool is None:
            # spawn: fork after torch has started threads can deadlock
            self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
            self._pool_jobs = jobs
        return self._pool

    def say(self, msg: str) -> None:
        self.log(f"[demo] {msg}")

    def run(self, name: str, folder: Path, inputs: dict, fn: Callable[[Path], dict],
            deps: list[StageResult] = ()) -> StageResult:
        """Run `fn(folder) -> result dict` unless a finished run with the same inputs is cached."""
        return self.run_many([Stage(name, folder, inputs, fn, tuple(deps))])[0]

    def run_many(self, stages: list[Stage], jobs: int = 1) -> list[StageResult]:
        """Run independent stages, `jobs` at a time in worker processes of one torch thread each (each
        worker's output goes to `<folder>/stage.log`); with jobs=1, one after another in this process.
        Results come back in the order of `stages`. `fn` must be picklable when jobs > 1. The workers
        stay up for the next call until `close()` (or the end of a `with StageRunner(...)` block)."""
        results: list[StageResult | None] = []
        todo = []  # (index, stage, key)
        for stage in stages:
            key, cached = self._lookup(stage)
            results.append(cached)
            if cached is None:
                todo.append((len(results) - 1, stage, key))
        if jobs <= 1 or len(todo) <= 1:
            for i, stage, key in todo:
                self._prepare(stage)
                start = time.perf_counter()
                results[i] = self._finish(stage, key, stage.fn(stage.folder), time.perf_counter() - start)
            return results
        pool = self._workers(jobs)
        futures = {}
        for i, stage, key in todo:
            self._prepare(stage, note=f" (worker log: {stage.folder / 'stage.log'})")
            futures[pool.submit(_run_in_worker, stage.fn, stage.folder)] = (i, stage, key)
        for fut in as_completed(futures):
            i, stage, key = futures[fut]
            try:
                result, wall = fut.result()
            except Exception as e:
                for other in futures:  # queued stages would only be redone
                    other.cancel()
                raise RuntimeError(f"stage '{stage.name}' failed in its worker process: {e}; its output is in "
                                   f"{stage.folder / 'stage.log'}") from e
            results[i] = self._finish(stage, key, result, wall)
            self.say(f"  done: {stage.name} [{wall:.0f} s]")
        return results

    def _lookup(self, stage: Stage) -> tuple[str, StageResult | None]:
        self.done += 1
        stage.number = self.done
        key = fingerprint({"inputs": stage.inputs, "deps": [d.key for d in stage.deps]})
        marker = stage.folder / MARKER
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                self.say(f"{self._head(stage)}: cached in {stage.folder} ({saved['wall_s']:.0f} s when it ran)")
                res = StageResult(stage.folder, key, saved["result"], saved["wall_s"], cached=True)
                self.results[stage.name] = res
                return key, res
            self.say(f"{self._head(stage)}: settings changed since the cached run; running it again")
        return key, None

    def _head(self, stage: Stage) -> str:
        return f"[{stage.number}/{self.total}] {stage.name}"

    def _prepare(self, stage: Stage, note: str = "") -> None:
        folder = stage.folder
        if folder.resolve().parent != self.root.resolve() and self.root.resolve() not in folder.resolve().parents:
            raise ValueError(f"stage folder {folder} is outside the demo folder {self.root}")
        if folder.exists():
            shutil.rmtree(folder)  # leftovers of a killed or outdated run: never mix two runs' files
        folder.mkdir(parents=True)
        self.say(f"{self._head(stage)} ...{note}")
        sys.stderr.flush()

    def _finish(self, stage: Stage, key: str, result: dict, wall: float) -> StageResult:
        tmp = stage.folder / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result, "wall_s": wall, "inputs": stage.inputs}, indent=2,
                                  default=str))
        tmp.replace(stage.folder / MARKER)  # written last: its presence means the stage finished
        res = StageResult(stage.folder, key, result, wall, cached=False)
        self.results[stage.name] = res
        return res


@dataclass
class Stage:
    """One cached unit of work: `fn(folder) -> result dict`, keyed by `inputs` and its deps' keys."""
    name: str
    folder: Path
    inputs: dict
    fn: Callable[[Path], dict]
    deps: tuple[StageResult, ...] = ()
    number: int = 0  # its place in the run, set when the runner reaches it


def _run_in_worker(fn: Callable[[Path], dict], folder: Path) -> tuple[dict, float]:
    """A worker process's side of run_many: one torch thread (the workers share the cores), output to
    the stage's log file, the transformers deprecation noise off as in the parent."""
    import warnings

    import torch

    torch.set_num_threads(1)
    log = open(folder / "stage.log", "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    start = time.perf_counter()
    result = fn(folder)
    return result, time.perf_counter() - start
