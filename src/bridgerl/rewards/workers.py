"""Reward workers: K Ray actors, each holding its own reward router (reward models, slow verifiers),
behind the router's interface `__call__(prompts, completions, rows) -> (scores, metrics)`.

The samples are split into K contiguous shares, scored in parallel and put back in order. An actor
that dies is replaced and its share re-scored (distributed/actors.py), so every sample gets a real
score; `workers/restarts` counts replacements. Failures of the reward functions themselves stay
what the router makes them: `failure_score` and a count, inside the worker."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch


class RewardWorker:
    """One actor: builds its router once (loading a reward model, starting a verifier) from a factory."""

    def __init__(self, build_router: Callable[[], Any], threads: int = 1):
        torch.set_num_threads(threads)
        self.router = build_router()

    def score(self, prompts: list, completions: list, rows: list[dict]) -> tuple[torch.Tensor, dict]:
        return self.router(prompts, completions, rows)

    def pid(self) -> int:
        import os

        return os.getpid()


def merge_share_metrics(shares: list[tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """One step's metrics from K shares' router metrics: counts and failures add up; a per-task mean is
    the count-weighted mean of the shares' means (equal to the router's mean over all samples)."""
    out: dict[str, float] = {}
    for _, m in shares:
        for k, v in m.items():
            if k.endswith("/mean"):
                continue
            out[k] = out.get(k, 0.0) + v
    for key in {k for _, m in shares for k in m if k.endswith("/mean")}:
        count_key = key[: -len("/mean")] + "/count"
        weighted = [(m[key], m.get(count_key, 1.0)) for _, m in shares if key in m]
        total = sum(c for _, c in weighted)
        out[key] = sum(v * c for v, c in weighted) / total if total else 0.0
    return out


class RayRewardPool:
    """`build_router` must be picklable (a module-level function or functools.partial); it runs once
    in each actor, so a reward model loads there, not in the trainer."""

    def __init__(self, build_router: Callable[[], Any], workers: int, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, num_cpus: int | None = None, timeout_s: float | None = None):
        from ..distributed.actors import ActorGroup, ensure_ray

        init_s = ensure_ray(num_cpus)
        start = time.perf_counter()
        self.group = ActorGroup(RewardWorker, workers, (build_router,), num_cpus=num_cpus_per_worker,
                                num_gpus=num_gpus_per_worker, timeout_s=timeout_s)
        self.startup = {"ray_init_s": init_s, "actors_s": time.perf_counter() - start}

    @property
    def restarts(self) -> int:
        return self.group.restarts

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 rows: Sequence[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        from ..distributed.actors import split_even

        if not (len(prompts) == len(completions) == len(rows)):
            raise ValueError(f"reward workers got {len(prompts)} prompts, {len(completions)} completions and "
                             f"{len(rows)} rows; they must match one per sample")
        if not rows:
            return torch.zeros(0), {"workers/restarts": float(self.restarts)}
        bounds = split_even(len(rows), len(self.group))
        shares = [(list(prompts[a:b]), list(completions[a:b]), list(rows[a:b])) for a, b in bounds]
        results = self.group.map("score", shares)
        scores = torch.cat([s for s, _ in results])
        return scores, merge_share_metrics(results) | {"workers/restarts": float(self.restarts)}

    def close(self) -> None:
        self.group.close()
