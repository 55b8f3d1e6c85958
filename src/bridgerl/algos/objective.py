"""The Objective protocol: how an algorithm turns scored rollouts into micro-batches and a loss.

An objective is built from its config (`build_objective`), sees only tensors, and never steps an
optimizer: `train/loop.py` sums `loss(policy, micro)` gradients over `batch.micro` and steps once
per pass. A new objective is one file here plus its config class and one line in registry.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..rollout.types import Rollouts

# rows [R] (indices into the step's rollouts) → the reference's token log-probs [R, T], no grad
ReferenceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BatchContext:
    """What an objective may use besides rollouts and rewards."""

    binary: torch.Tensor  # [G] bool: the group's task has verifiable 0/1 rewards
    reference: ReferenceFn | None  # None when the run has no reference model
    policy_version: int  # the trainer's step: samples of this version are on-policy
    micro_batch: int  # sequences per forward/backward
    rng: torch.Generator | None = None  # for random pair choices
    max_new_tokens: int | None = None  # the sampler's length cap (Dr.GRPO's constant normaliser)


@dataclass
class TrainBatch:
    """An objective's training batch: one entry of `micro` per forward/backward."""

    micro: list[Any] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # known before any forward (groups/skipped, ...)

    @property
    def empty(self) -> bool:
        return not self.micro


class Objective(Protocol):
    passes: int  # optimizer steps per batch (GRPO's updates_per_batch; 1 elsewhere)
    needs_reference: bool

    def make_batch(self, rollouts: Rollouts, rewards: torch.Tensor, ctx: BatchContext) -> TrainBatch:
        """rollouts of G groups × n, rewards [G, n] (already shaped) → the batch that trains."""
        ...

    def loss(self, policy: torch.nn.Module, micro: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the batch loss (their sum is the batch loss) and its metrics."""
        ...


def spread_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[G, n] → [G] bool: groups whose rewards differ, the only ones that carry a training signal."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values


def spread_rows(rewards: torch.Tensor) -> torch.Tensor:
    """Row indices (g·n + i) of the groups whose rewards differ."""
    return spread_groups(rewards).repeat_interleave(rewards.shape[1]).nonzero().squeeze(1)


def mean_metrics(items: list[dict]) -> dict[str, float]:
    """Micro-batch metrics → one value per key: the max for `*/max` keys, the mean otherwise."""
    keys = {k for m in items for k in m}
    return {k: max(m[k] for m in items if k in m) if k.endswith("/max")
            else sum(m[k] for m in items if k in m) / sum(1 for m in items if k in m) for k in keys}
