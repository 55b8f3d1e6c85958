"""A fixed-size group of Ray actors that survives a dying member: the dead actor is started again,
brought back to the group's current state (e.g. the last weight push), and its share is re-run, so
a step never silently shrinks. Generator workers (rollout/workers.py) and reward workers
(rewards/workers.py) are both built on it. Imported only when workers are asked for."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, WorkerCrashedError

# A worker process that vanished (killed, OOM, node lost) or hung past the group's timeout (it is killed
# and replaced). An exception raised by our own code inside a live actor is a RayTaskError and
# propagates: re-running it would only fail again.
WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError, GetTimeoutError)


def ensure_ray(num_cpus: int | None = None) -> float:
    """Connect to the Ray cluster named by RAY_ADDRESS, or start a local one; seconds it took (0 if
    already up). Local workers get this checkout's package on PYTHONPATH, so an editable or
    PYTHONPATH=src install imports the same bridgerl in every worker."""
    if ray.is_initialized():
        return 0.0
    import bridgerl

    start = time.perf_counter()
    src = str(Path(bridgerl.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return time.perf_counter() - start


class ActorGroup:
    """`count` actors of `actor_cls(*init_args)`; `restore(actor)` (optional) returns an ObjectRef
    that brings a fresh actor up to date and is awaited before it takes work."""

    def __init__(self, actor_cls: type, count: int, init_args: tuple = (), num_cpus: float = 1,
                 num_gpus: float = 0, restore: Callable[[Any], Any] | None = None, max_retries: int = 3,
                 timeout_s: float | None = None):
        if count < 1:
            raise ValueError(f"a worker group needs at least one actor, got {count}")
        self.remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(actor_cls)
        self.init_args = init_args
        self.restore = restore
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.restarts = 0
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.actors = [self.remote_cls.remote(*init_args) for _ in range(count)]
        self._wait_ready(self.actors)

    def _wait_ready(self, actors: list, timeout_s: float = 300) -> None:
        """Actors that cannot be placed wait forever in Ray; say why instead."""
        try:
            ray.get([a.__ray_ready__.remote() for a in actors], timeout=timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"{len(actors)} worker(s) needing {self.num_cpus} CPU and {self.num_gpus} GPU each did not start within "
                f"{timeout_s:.0f} s; the Ray cluster has {ray.cluster_resources()}. Lower rollout.workers / "
                "rewards.workers or give Ray more resources (ray start --num-cpus/--num-gpus).") from None

    def __len__(self) -> int:
        return len(self.actors)

    def _replace(self, i: int) -> None:
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 — it is already gone; killing is only a guarantee
            pass
        actor = self.remote_cls.remote(*self.init_args)
        self._wait_ready([actor])
        if self.restore is not None:
            ray.get(self.restore(actor))
        self.actors[i] = actor
        self.restarts += 1

    def broadcast(self, method: str, *args) -> list:
        """Call `method(*args)` on every actor (e.g. a weight push); a dead actor is replaced, and a
        replacement is already current through `restore`, so the call is not repeated on it."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.timeout_s))
            except WORKER_LOST:
                self._replace(i)
                out.append(None)
        return out

    def map(self, method: str, shares: list[tuple]) -> list:
        """Share i runs as `actors[i].method(*shares[i])`, all at once; results in share order. A
        share whose actor died runs again on its replacement, up to `max_retries` times."""
        if len(shares) > len(self.actors):
            raise ValueError(f"{len(shares)} shares for {len(self.actors)} actors")
        refs = [getattr(self.actors[i], method).remote(*share) for i, share in enumerate(shares)]
        results = []
        for i, ref in enumerate(refs):
            for attempt in range(self.max_retries + 1):
                try:
                    results.append(ray.get(ref, timeout=self.timeout_s))
                    break
                except WORKER_LOST:
                    if attempt == self.max_retries:
                        raise RuntimeError(f"worker {i} died {attempt + 1} times running its share; giving up "
                                           f"(see the Ray logs under /tmp/ray/session_latest/logs)") from None
                    self._replace(i)
                    ref = getattr(self.actors[i], method).remote(*shares[i])
        return results

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []


def split_even(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous, near-equal slices of range(count), dropping empty ones."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
