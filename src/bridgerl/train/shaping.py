"""Reward shaping between scoring and the objective: GRPOVI's variance increase (algorithms.md §3)."""
from __future__ import annotations

import torch

from ..config import GRPOConfig


def shape_rewards(run, rows: list[dict], batch, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """rewards [G, n] → shaped rewards [G, n] and metrics. Identity unless the algo asks for shaping."""
    algo = run.cfg.algo
    if not isinstance(algo, GRPOConfig) or algo.reward_shaping == "none":
        return rewards, {}
    from ..algos.variance import increase_variance_groups, probs_from_logps
    from .logprobs import micro_batches, token_logprobs

    G, n = rewards.shape
    probs = None
    if algo.shaping_probs == "reference":
        seq = torch.empty(G * n, device=rewards.device)
        with torch.no_grad():
            for chunk in micro_batches(G * n, batch.lengths, run.cfg.train.micro_batch):
                seq[chunk.to(seq.device)] = token_logprobs(run.reference, batch.select(chunk))[0].sum(dim=1).to(seq.device)
        probs = probs_from_logps(seq.view(G, n))
    tasks = run.cfg.rewards.tasks
    low = torch.tensor([_bound(tasks[r["task"]].low, rewards[i].min()) for i, r in enumerate(rows)])
    high = torch.tensor([_bound(tasks[r["task"]].high, rewards[i].max()) for i, r in enumerate(rows)])
    shaped = increase_variance_groups(rewards, probs, low, high)
    w = probs if probs is not None else torch.full_like(rewards, 1.0 / n)

    def weighted_var(r):
        mean = (w * r).sum(dim=1, keepdim=True)
        return (w * (r - mean) ** 2).sum(dim=1).mean().item()

    return shaped, {"reward/var_before": weighted_var(rewards), "reward/var_after": weighted_var(shaped)}


def _bound(known: float | None, group_value: torch.Tensor) -> float:
    return float(known) if known is not None else float(group_value)
