"""Run a call with a wall-clock limit from any thread, without signals.

`signal.alarm` (what Math-Verify uses) only works on the main thread, and rewards run on
worker threads (Ray actors, the router's pool). Here each call runs on a daemon worker
thread and the caller waits on a future with a timeout. Python cannot kill a thread, so a
call that never returns keeps its worker forever: one leaked daemon thread per hung call,
which dies with the process. The pool is bounded; when every worker is stuck, a new call
waits at most its own timeout for one to free up and then raises `TimeoutError`, so a
hanging function can never block later calls forever.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["call_with_timeout", "cpu_time_limit", "process_cpu_seconds", "TimeoutPool", "DEFAULT_POOL"]


class _Worker:
    def __init__(self, pool: "TimeoutPool", index: int):
        self.pool = pool
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"bridgerl-timeout-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn, args, kwargs, future = self.jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 — handed to the caller, who decides
                    future.set_exception(exc)
            del fn, args, kwargs, future  # drop references before idling
            self.pool._release(self)


class TimeoutPool:
    """A bounded set of reusable daemon threads that run calls with a deadline."""

    def __init__(self, max_workers: int = 32):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._idle: list[_Worker] = []
        self._live = 0
        self._freed = threading.Condition()

    @property
    def busy(self) -> int:
        """Workers running a call right now (including ones stuck in a call that never returned)."""
        with self._freed:
            return self._live - len(self._idle)

    def _release(self, worker: _Worker) -> None:
        with self._freed:
            self._idle.append(worker)
            self._freed.notify()

    def _acquire(self, deadline: float) -> _Worker:
        with self._freed:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._live < self.max_workers:
                    self._live += 1
                    return _Worker(self, self._live)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"all {self.max_workers} timeout workers are stuck in calls that never returned; "
                        "fix or remove the hanging reward function")
                self._freed.wait(remaining)

    def call(self, fn: Callable, args: tuple = (), kwargs: dict | None = None,
             timeout_s: float | None = None) -> Any:
        """`fn(*args, **kwargs)`, or `TimeoutError` after `timeout_s` seconds (None: no limit, run inline)."""
        if timeout_s is None:
            return fn(*args, **(kwargs or {}))
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        deadline = time.monotonic() + timeout_s
        worker = self._acquire(deadline)
        future: Future = Future()
        worker.jobs.put((fn, args, kwargs or {}, future))
        # Since 3.11 concurrent.futures.TimeoutError is the builtin TimeoutError.
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if future.done() and future.exception() is None:  # finished in the gap
                return future.result()
            if future.done():
                raise future.exception() from None
            name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
            raise TimeoutError(f"{name} did not return within {timeout_s:g} s") from None


DEFAULT_POOL = TimeoutPool()


def call_with_timeout(fn: Callable, args: tuple = (), timeout_s: float | None = None,
                      kwargs: dict | None = None) -> Any:
    """Return `fn(*args, **kwargs)` or raise `TimeoutError` after `timeout_s` s; safe on any thread.

    A call that never returns leaks one daemon worker thread (see module docstring).
    """
    return DEFAULT_POOL.call(fn, args, kwargs, timeout_s)


class _CPUTimeExpired(BaseException):
    """Raised inside the limited block; a BaseException, because the libraries we limit (Math-Verify,
    sympy) catch `Exception` all over and would swallow a TimeoutError and go on computing."""


def _expired(signum, frame):
    raise _CPUTimeExpired


@contextmanager
def cpu_time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError from the block once this process has spent `seconds` of CPU time in it.

    Main thread only (it uses SIGPROF). A wall-clock alarm fires as well when the process is only
    waiting for a core, so on a loaded machine a sample that would have passed scores as a timeout
    and the run depends on the load; CPU time does not. After the first expiry the signal repeats
    every 0.1 s of CPU, in case the code in the block caught it. A block that sleeps or waits on I/O
    uses no CPU and is never stopped here: rewards/pool.py's wall-clock cap is the backstop."""
    previous = signal.signal(signal.SIGPROF, _expired)
    signal.setitimer(signal.ITIMER_PROF, seconds, 0.1)
    try:
        yield
    except _CPUTimeExpired:
        signal.setitimer(signal.ITIMER_PROF, 0)
        raise TimeoutError(f"used {seconds:g} s of CPU time") from None
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux /proc), or None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)
