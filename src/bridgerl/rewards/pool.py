"""Reward functions in killable worker processes.

A thread cannot be stopped: a reward that holds the GIL inside one C call (sympy expanding
`9^{9^{9^{9}}}`, a user function's `sum(range(10**15))`) blocks its thread, and with it the
run, forever. So verifiers run in a bounded pool of worker processes that are reused from step
to step. A sample that uses more than its timeout of CPU time (or blocks for WALL_CAP times it
without using any) gets its worker SIGKILLed; counting CPU time, a worker that only waited for
a core on a loaded machine is left to finish, so a run scores the same under load. The killed
call's samples are reported as timeouts (the router scores them `rewards.failure_score` and
counts them in `reward/timeouts`), and a fresh worker is started at once in the background, so
later calls run as fast as before.

Throughput: the parent sends one message per chunk of samples (a task's samples split over the
idle workers), and a worker answers with its chunk's scores in one message (or a few, on a slow
chunk). Per-sample functions (Math-Verify, reasoning-gym) also post *which* sample they are on,
and since when, to a 24-byte shared-memory board; the parent reads it only when a deadline
passes. So each sample gets the full timeout, a kill blames exactly the sample that hung, and
the chunk's other unscored samples go to another worker, all without a message per sample. A
whole-batch function (a user's `f(prompts, completions, **columns)`) is one call: it is not
split, since it may depend on the batch (e.g. normalise within it), and a kill fails its call.

Functions travel as "module:function" names and are imported inside the worker, so nothing but
plain data (strings, numbers, lists, dicts) crosses the socket. This module imports only the
standard library, so a worker starts without loading torch.

Workers are started as `python -c ...` subprocesses talking over a socket pair rather than by
multiprocessing's "spawn", which re-imports the parent's `__main__` in each child: a user's
script without an `if __name__ == "__main__":` guard would run again in every worker.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .timeout import process_cpu_seconds

__all__ = ["RewardPool", "Failure", "PooledReward", "shared_pool"]

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # a worker importing sympy/reasoning-gym on a loaded machine
MIN_CHUNK = 4  # fewer samples per message than this costs more in messaging than it gains
FLUSH_S = 0.05  # a slow chunk reports what it has scored at least this often
# The board: (job id, position in the job, time.monotonic() and the worker's CPU seconds when that
# position started). CLOCK_MONOTONIC is one clock for all processes on Linux, so the parent can compare.
BOARD = struct.Struct("qqdd")
_IDS, _TIMES = struct.Struct("qq"), struct.Struct("dd")  # its two halves, written times first
# A sample's timeout counts the worker's CPU time, so that a worker that only waited for a core (a
# loaded machine) is not killed and the run does not depend on the load; one that sleeps or blocks
# uses no CPU, so wall time this many times the timeout kills it anyway.
WALL_CAP = 3.0


def _post(board: mmap.mmap, job_id: int, pos: int) -> None:
    """Worker side: the sample's start times first, then which sample it is, each as one copy of
    packed bytes. (`Struct.pack_into` zeroes its target before filling it: a worker preempted in
    between left a board that read "current job, started at time 0" and the parent killed a
    healthy worker, a "timeout" after milliseconds. The parent trusts the times only when the job
    id is its chunk's, so the order also keeps a new id from pairing with an old sample's times.)"""
    board[16:32] = _TIMES.pack(time.monotonic(), time.process_time())
    board[0:16] = _IDS.pack(job_id, pos)


def _read(board: mmap.mmap) -> tuple[int, int, float, float]:
    """Parent side: the board as one consistent snapshot (read again while the worker writes it)."""
    snapshot = BOARD.unpack_from(board, 0)
    for _ in range(100):
        again = BOARD.unpack_from(board, 0)
        if again == snapshot:
            break
        snapshot = again
    return snapshot


@dataclass(frozen=True)
class Failure:
    """A sample that got no score: `kind` is one of the router's FAILURE_KINDS."""
    kind: str
    detail: str


# --------------------------------------------------------------------------- worker side


def _take(kwargs: dict, rows: list[int] | range, n: int) -> dict:
    """Per-sample columns (lists of length n) at `rows`; other values passed whole."""
    if isinstance(rows, range) and rows == range(n):
        return kwargs
    return {k: ([v[i] for i in rows] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}


def _plain(values: Any) -> list | None:
    """A function's return value as a picklable list of floats/None, or None if not a sequence."""
    try:
        items = list(values)
    except TypeError:
        return None
    out = []
    for v in items:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(None)
    return out


_BOOT = ("import json, os, sys; sys.path[:] = json.loads(os.environ['BRIDGERL_WORKER_SYS_PATH']); "
         "from bridgerl.rewards.pool import _worker_entry; _worker_entry()")


def _worker_entry() -> None:
    conn = Connection(int(os.environ["BRIDGERL_WORKER_FD"]))
    board = mmap.mmap(int(os.environ["BRIDGERL_WORKER_BOARD"]), BOARD.size)
    _worker_main(conn, board, tuple(json.loads(os.environ["BRIDGERL_WORKER_PRELOAD"])))


def _worker_main(conn: Connection, board: mmap.mmap, preload: tuple[str, ...]) -> None:
    # The parent decides when a worker stops; Ctrl-C in the terminal reaches the whole process
    # group, and a worker dying on it mid-step would turn an interrupt into reward failures.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["BRIDGERL_REWARD_WORKER"] = "1"  # rewards/math.py: use Math-Verify's signal timeouts
    from .python_fn import load_callable

    fns: dict[str, Any] = {}

    def fn_for(spec: str):
        if spec not in fns:
            fns[spec] = load_callable(spec)
        return fns[spec]

    for spec in preload:
        try:
            # A function's `warm_up()` does its lazy imports and caches now, before the worker
            # counts as ready, so the first timed call is not charged seconds of importing.
            getattr(fn_for(spec), "warm_up", lambda: None)()
        except Exception:  # noqa: BLE001 — reported again, with the message, on the first call
            pass
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone (even kill -9): nothing left to do
            return
        if job is None:
            return
        job_id, spec, kwargs, n, per_sample, extra, path = job
        if path != sys.path:  # e.g. a test or notebook put a user's reward folder on sys.path
            sys.path[:] = path
        try:
            fn = fn_for(spec)
        except Exception as exc:  # noqa: BLE001
            conn.send(("done", None, f"{type(exc).__name__}: {exc}"))
            continue
        if not per_sample:
            _post(board, job_id, 0)
            try:
                conn.send(("done", _plain(fn(**kwargs, **extra)), None))
            except Exception as exc:  # noqa: BLE001
                conn.send(("done", None, f"{type(exc).__name__}: {exc}"))
            continue
        scored: list[tuple[int, Any]] = []
        flushed = time.monotonic()
        for i in range(n):
            _post(board, job_id, i)
            try:
                out = _plain(fn(**_take(kwargs, range(i, i + 1), n), **extra))
                value = out[0] if out is not None and len(out) == 1 else Failure(
                    "length", f"returned {'a non-sequence' if out is None else len(out)} for 1 sample")
            except Exception as exc:  # noqa: BLE001 — a failed sample is data, not a crash
                value = Failure("exception", f"{type(exc).__name__}: {exc}")
            scored.append((i, value))
            if time.monotonic() - flushed >= FLUSH_S and i + 1 < n:
                conn.send(("some", scored))
                scored, flushed = [], time.monotonic()
        conn.send(("done", scored, None))


# --------------------------------------------------------------------------- parent side


@dataclass
class _Chunk:
    indices: list[int]  # positions in the call's samples; the worker sees them as 0..len-1
    per_sample: bool
    job: int = 0
    sent: float = 0.0
    scored: set[int] = field(default_factory=set)  # local positions with a result


@dataclass
class _Worker:
    process: Any
    conn: Connection
    board: mmap.mmap
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    chunk: _Chunk | None = None


class RewardPool:
    """A bounded pool of worker processes, reused across calls and runs, that run reward
    functions with a hard timeout. One call at a time (a lock); `close()` or the end of this
    process stops the workers."""

    def __init__(self, processes: int = 2, preload: tuple[str, ...] = ()):
        if processes < 1:
            raise ValueError(f"a reward pool needs processes >= 1, got {processes}")
        self.processes = processes
        self.preload = tuple(preload)
        self._lock = threading.Lock()
        self._jobs = 0
        self.kills = 0  # workers killed for a timeout, over the pool's life
        self._startup_deaths = 0
        self._workers: list[_Worker] = [self._start() for _ in range(processes)]

    def _start(self) -> _Worker:
        parent, child = socket.socketpair()
        fd, path = tempfile.mkstemp(prefix="bridgerl-reward-board-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.unlink(path)  # only the two processes' descriptors keep it
        os.write(fd, bytes(BOARD.size))
        board = mmap.mmap(fd, BOARD.size)
        env = dict(os.environ, BRIDGERL_WORKER_FD=str(child.fileno()), BRIDGERL_WORKER_BOARD=str(fd),
                   BRIDGERL_WORKER_SYS_PATH=json.dumps(sys.path), BRIDGERL_WORKER_PRELOAD=json.dumps(self.preload),
                   OMP_NUM_THREADS="1")  # a verifier needs no BLAS threads; the trainer has the cores
        try:
            proc = subprocess.Popen([sys.executable, "-c", _BOOT], env=env, pass_fds=(child.fileno(), fd),
                                    stdin=subprocess.DEVNULL)
        finally:
            child.close()
            os.close(fd)
        return _Worker(proc, Connection(parent.detach()), board)

    @staticmethod
    def _stop(w: _Worker, kill: bool) -> None:
        if kill and w.process.poll() is None:
            w.process.kill()  # SIGKILL: a worker stuck in C ignores everything else
        try:
            w.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait(timeout=5)
        w.conn.close()
        w.board.close()

    def _replace(self, w: _Worker) -> None:
        self._stop(w, kill=True)
        self._workers[self._workers.index(w)] = self._start()

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        """Block until every worker has started (imports done); False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not all(w.ready for w in self._workers):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for w in list(self._workers):
                    if not w.ready and w.conn in wait([w.conn], timeout=left):
                        self._receive(w, [], [])
            return True

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
            for w in self._workers:
                self._stop(w, kill=False)
            self._workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass

    def run(self, spec: str, kwargs: dict, n: int, timeout_s: float, per_sample: bool,
            extra: dict | None = None) -> list[Any]:
        """`spec`'s scores for n samples: one entry per sample, a float/None, or a `Failure`.

        `kwargs` are TRL-style columns (lists of length n) plus anything passed whole; `extra`
        keyword arguments go to every call unchanged (e.g. Math-Verify's own timeout)."""
        if not self._workers:
            raise RuntimeError("the reward pool was closed")
        results: list[Any] = [None] * n
        if n == 0:
            return results
        if per_sample:
            size = max(MIN_CHUNK, -(-n // self.processes))
            todo = [_Chunk(list(range(s, min(n, s + size))), True) for s in range(0, n, size)]
        else:
            todo = [_Chunk(list(range(n)), False)]
        with self._lock:
            self._drive(spec, kwargs, n, timeout_s, extra or {}, todo, results)
        return results

    def _send(self, w: _Worker, chunk: _Chunk, spec: str, kwargs: dict, n: int, extra: dict) -> None:
        self._jobs += 1
        chunk.job, chunk.sent = self._jobs, time.monotonic()
        rows = range(chunk.indices[0], chunk.indices[-1] + 1)
        if list(rows) != chunk.indices:
            rows = chunk.indices
        w.conn.send((chunk.job, spec, _take(kwargs, rows, n), len(chunk.indices), chunk.per_sample, extra,
                     list(sys.path)))
        w.chunk = chunk

    def _deadline(self, w: _Worker, timeout_s: float) -> tuple[float, int | None]:
        """When `w`'s current sample may next run out of time, and its local position (None: not
        started). At first that is `timeout_s` of wall time after it started; from then on, what is
        left of its `timeout_s` of CPU time, but never past WALL_CAP × `timeout_s` of wall time."""
        job, pos, since, cpu_since = _read(w.board)
        if job != w.chunk.job or since == 0.0:  # not started this chunk yet (or its times not written)
            pos, since, cpu_since = None, w.chunk.sent, None
        deadline = since + timeout_s
        if time.monotonic() < deadline or timeout_s == float("inf"):
            return deadline, pos
        cpu = process_cpu_seconds(w.process.pid)
        if cpu is not None:  # where /proc cannot be read, the limit stays wall time
            left = timeout_s - (0.0 if cpu_since is None else cpu - cpu_since)
            if left > 0:
                deadline = min(time.monotonic() + max(left, 0.05), since + WALL_CAP * timeout_s)
        return deadline, pos

    def _drive(self, spec, kwargs, n, timeout_s, extra, todo: list[_Chunk], results: list) -> None:
        while todo or any(w.chunk for w in self._workers):
            for w in self._workers:
                if w.ready and w.chunk is None and todo:
                    self._send(w, todo.pop(0), spec, kwargs, n, extra)
            now = time.monotonic()
            waits = [self._deadline(w, timeout_s)[0] - now for w in self._workers if w.chunk] + \
                [w.started + STARTUP_TIMEOUT_S - now for w in self._workers if not w.ready]
            limit = min(waits) if waits else float("inf")
            ready = wait([w.conn for w in self._workers], timeout=None if limit == float("inf") else max(0.0, limit))
            for w in list(self._workers):
                if w.conn in ready:
                    self._receive(w, results, todo)
            now = time.monotonic()
            for w in list(self._workers):
                if w.chunk is not None:
                    deadline, pos = self._deadline(w, timeout_s)
                    if now >= deadline:
                        self._on_timeout(w, pos, timeout_s, results, todo)
                elif not w.ready and now >= w.started + STARTUP_TIMEOUT_S:
                    logger.warning("a reward worker did not start within %.0f s; starting another", STARTUP_TIMEOUT_S)
                    self._replace(w)

    @staticmethod
    def _requeue(chunk: _Chunk, skip: int | None, todo: list[_Chunk]) -> None:
        rest = [g for k, g in enumerate(chunk.indices) if k not in chunk.scored and k != skip]
        if rest:
            todo.insert(0, _Chunk(rest, chunk.per_sample))

    def _receive(self, w: _Worker, results: list, todo: list[_Chunk]) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):  # the worker died on its own (a crash, os._exit, the OOM killer)
            self._on_death(w, results, todo)
            return
        if msg[0] == "ready":
            w.ready = True
            self._startup_deaths = 0
            return
        chunk = w.chunk
        if msg[0] == "some":
            for k, value in msg[1]:
                results[chunk.indices[k]] = value
                chunk.scored.add(k)
            return
        # "done"
        w.chunk = None
        values, error = msg[1], msg[2]
        if error is not None:
            failure = Failure("exception", error)
            for i in chunk.indices:
                results[i] = failure
        elif chunk.per_sample:
            for k, value in values:
                results[chunk.indices[k]] = value
        elif values is None or len(values) != len(chunk.indices):
            got = "a non-sequence" if values is None else f"{len(values)} scores"
            failure = Failure("length", f"returned {got} for {len(chunk.indices)} samples")
            for i in chunk.indices:
                results[i] = failure
        else:
            for i, v in zip(chunk.indices, values):
                results[i] = v

    def _on_death(self, w: _Worker, results: list, todo: list[_Chunk]) -> None:
        code = w.process.poll()
        if not w.ready:
            self._startup_deaths += 1
            if self._startup_deaths >= 3:  # no progress is possible: say so instead of looping
                self._stop(w, kill=True)
                self._workers.remove(w)
                raise RuntimeError(
                    f"reward worker processes exit while starting (exit code {code}); their error is printed "
                    "above. Run `python -c \"import bridgerl.rewards.pool\"` to check the install, or set "
                    "rewards.processes=0 to score in the trainer process")
        chunk = w.chunk
        if chunk is not None:
            self._blame(chunk, self._deadline(w, 0.0)[1],
                        Failure("exception", f"the reward worker died (exit code {code})"), results, todo)
        self._replace(w)

    def _blame(self, chunk: _Chunk, pos: int | None, failure: Failure, results: list, todo: list[_Chunk]) -> None:
        """`failure` for the sample at local `pos` (the first unscored one if unknown); a
        per-sample chunk's other unscored samples go back in the queue, a batch call fails whole."""
        if not chunk.per_sample:
            for i in chunk.indices:
                results[i] = failure
            return
        unscored = [k for k in range(len(chunk.indices)) if k not in chunk.scored]
        if not unscored:  # everything arrived; only the closing message was lost
            return
        if pos is None or pos in chunk.scored:
            pos = unscored[0]
        results[chunk.indices[pos]] = failure
        self._requeue(chunk, pos, todo)

    def _on_timeout(self, w: _Worker, pos: int | None, timeout_s: float, results: list, todo: list[_Chunk]) -> None:
        failure = Failure("timeout", f"did not return within {timeout_s:g} s; its worker process was killed")
        self._blame(w.chunk, pos, failure, results, todo)
        self.kills += 1
        self._replace(w)


@dataclass
class PooledReward:
    """A reward function the router runs in a `RewardPool` by its "module:function" name.

    `per_sample`: the function scores samples independently, so the pool may split a batch and
    pinpoint a hanging sample. `extra`: keyword arguments added to every call."""
    spec: str
    pool: RewardPool
    per_sample: bool
    extra: dict = field(default_factory=dict)

    @property
    def __name__(self) -> str:  # the router's messages name the function
        return self.spec

    def run(self, kwargs: dict, n: int, timeout_s: float) -> list[Any]:
        return self.pool.run(self.spec, kwargs, n, timeout_s, self.per_sample, self.extra)

    def __call__(self, **kwargs: Any) -> list:
        """Plain TRL-style call (all samples must score, else RuntimeError)."""
        n = len(kwargs["completions"])
        out = self.run(kwargs, n, timeout_s=float("inf"))
        bad = [r for r in out if isinstance(r, Failure)]
        if bad:
            raise RuntimeError(f"{self.spec}: {len(bad)} of {n} samples failed ({bad[0].kind}: {bad[0].detail})")
        return out


_SHARED: dict[int, RewardPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(processes: int, preload: tuple[str, ...] = ()) -> RewardPool:
    """The process-wide pool with this many workers, started on first use and reused by every
    run in this process (the demo and the tests build many runs: each would otherwise pay the
    workers' start-up, ~1 s of imports each). Workers import functions by name on first call,
    so runs with different reward functions share them safely."""
    with _SHARED_LOCK:
        pool = _SHARED.get(processes)
        if pool is None or not pool._workers:
            pool = _SHARED[processes] = RewardPool(processes, preload)
        return pool
