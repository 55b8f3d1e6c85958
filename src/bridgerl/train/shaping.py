"""Reward shaping between scoring and the objective: GRPOVI's variance increase (algorithms.md §3.3)."""
from __future__ import annotations

import torch

from ..config import GRPOConfig


def shape_rewards(run, rows: list[dict], rewards: torch.Tensor,
                  ref_logps: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """rewards [G, n] → shaped rewards [G, n] and metrics. Identity unless the algo asks for shaping.

    p comes from the reference model (π_θ(0) unless the reference is synced) as a softmax of the
    group's sequence log-probs, summed from the step's reference token log-probs `ref_logps` [G·n, T]
    (zero-spread groups may hold zeros there: shaping leaves them unchanged whatever p is);
    [m, M] is the task's known range, else the group's own min/max."""
    algo = run.cfg.algo
    if not isinstance(algo, GRPOConfig) or algo.reward_shaping == "none":
        return rewards, {}
    from ..algos.variance import increase_variance_groups, probs_from_logps, variance_increase_metrics

    G, n = rewards.shape
    probs = None
    if algo.shaping_probs == "reference":
        probs = probs_from_logps(ref_logps.sum(dim=1).cpu().view(G, n))
    nan = float("nan")
    bounds = torch.tensor([[b if b is not None else nan for b in run.cfg.rewards.tasks[r["task"]].bounds] for r in rows])
    # A failure score outside the known range widens it rather than breaking the solver.
    low = torch.fmin(bounds[:, 0], rewards.min(dim=1).values)
    high = torch.fmax(bounds[:, 1], rewards.max(dim=1).values)
    shaped = increase_variance_groups(rewards, probs, low, high)
    return shaped, variance_increase_metrics(rewards, shaped, probs)
