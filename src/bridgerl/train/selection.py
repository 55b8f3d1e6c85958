"""Which of the step's samples train: bounded staleness (`rollout.max_staleness`) and DAPO's dynamic
sampling (`rollout.dynamic_sampling`). The bookkeeping is algos/sampling.py; this file only
draws more prompts and cuts the batch, so the loop calls one function."""
from __future__ import annotations

from typing import Callable

import torch

from ..algos.sampling import DynamicBatch, fresh_enough
from ..rollout.types import Rollouts, concat_rollouts
from .run import Run

Batch = tuple[list[dict], Rollouts, torch.Tensor]  # rows (prompts), rollouts [G·n], rewards [G, n]
# the loop's sampler: (run, rows, timer) → (rollouts, rewards [G, n], sampler metrics)
Sampler = Callable[[Run, list[dict], object], tuple[Rollouts, torch.Tensor, dict[str, float]]]


def group_rows(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Group indices [k] → their sample rows [k·n]."""
    return (groups[:, None] * n + torch.arange(n)).reshape(-1)


def cut(batch: Batch, groups: torch.Tensor, n: int) -> Batch:
    rows, rollouts, rewards = batch
    return [rows[g] for g in groups.tolist()], rollouts.select(group_rows(groups, n)), rewards[groups]


def drop_stale(run: Run, batch: Batch) -> tuple[Batch, dict[str, float]]:
    """Drop the groups made by weights more than `rollout.max_staleness` versions behind the policy."""
    k, n = run.cfg.rollout.max_staleness, run.cfg.rollout.n
    keep, metrics = fresh_enough(batch[1].versions.cpu(), run.step, k, n=n)
    groups = keep.view(-1, n)[:, 0].nonzero().squeeze(1)
    if len(groups) == 0:
        raise RuntimeError(f"step {run.step}: every sample is more than rollout.max_staleness={k} versions old "
                           f"(the generator holds version {run.generator.version}); sync the generator more often "
                           "(rollout.sync_every) or raise rollout.max_staleness")
    if len(groups) == len(batch[0]):
        return batch, metrics
    return cut(batch, groups, n), metrics


def refill(run: Run, batch: Batch, timer, sample: Sampler) -> tuple[Batch, dict[str, float]]:
    """DAPO's dynamic sampling: keep the groups whose rewards spread more than `tol` and sample further
    prompts until `prompts_per_step` such groups are held or `max_rounds` extra rounds are spent.
    Nothing informative at all: the batch stays as it was (the objective skips it and says so)."""
    ds, n = run.cfg.rollout.dynamic_sampling, run.cfg.rollout.n
    filler = DynamicBatch(target=len(batch[0]), max_rounds=ds.max_rounds, tol=ds.tol)
    rounds = [(batch, filler.add(batch[2], batch[1].completion_mask.view(len(batch[0]), n, -1).sum(dim=(1, 2))))]
    metrics = {"tokens/generated": 0.0, "reward/failures": 0.0}
    all_rewards = [batch[2].flatten()]
    while filler.needs_more():
        rows = run.stream.next_batch()
        rollouts, rewards, m = sample(run, rows, timer)
        for key in metrics:
            metrics[key] += m.get(key, 0.0)
        all_rewards.append(rewards.flatten())
        more = (rows, rollouts, rewards)
        rounds.append((more, filler.add(rewards, rollouts.completion_mask.view(len(rows), n, -1).sum(dim=(1, 2)))))
    metrics |= filler.metrics() | {"sampling/reward_mean_all": torch.cat(all_rewards).float().mean().item()}
    if filler.groups == 0:
        return batch, metrics
    parts = [cut(b, take, n) for b, take in rounds if len(take)]
    rows = [r for p in parts for r in p[0]]
    rollouts = concat_rollouts([p[1] for p in parts], run.tokenizer.pad_token_id)
    return (rows, rollouts, torch.cat([p[2] for p in parts])), metrics


def select_samples(run: Run, batch: Batch, sampled: dict[str, float], timer,
                   sample: Sampler) -> tuple[Batch, dict[str, float]]:
    """The step's batch after bounded staleness and dynamic sampling, each off unless configured.
    `sampled` (the first round's sampler metrics) gains the extra rounds' generated tokens; `sample`
    draws the extra rounds (the loop's sample_batch, passed in so this module need not import the loop)."""
    cfg = run.cfg.rollout
    metrics = dict(sampled)
    if cfg.max_staleness is not None:
        batch, m = drop_stale(run, batch)
        metrics |= m
    if cfg.dynamic_sampling.max_rounds:
        batch, m = refill(run, batch, timer, sample)
        for key in ("tokens/generated", "reward/failures"):
            metrics[key] = metrics.get(key, 0.0) + m.pop(key)
        metrics |= m
    return batch, metrics
