"""Which samples a step trains on: DAPO's dynamic sampling (keep only groups whose rewards differ,
and sample more prompts until the batch is full) and bounded staleness (drop samples produced by
weights more than k versions old). Pure tensor bookkeeping: the loop does the sampling."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def informative_groups(rewards: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """rewards [G, n] → bool [G]: the group's spread (max − min) exceeds `tol`. A group without
    spread has all advantages 0 under every GRPO variant, so it costs a forward and teaches nothing;
    `tol` > 0 also drops groups whose continuous rewards differ only by noise."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, n], got shape {tuple(rewards.shape)}")
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > tol


def fresh_enough(versions: torch.Tensor,  # [S] weights version that produced each sample
                 policy_step: int,  # the version the policy has now
                 max_staleness: int | None,
                 n: int = 1,  # samples per group: a group is kept or dropped whole
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """bool [S]: samples at most `max_staleness` versions behind the policy (None: all). With
    n > 1 a group goes if any of its samples is too old, so GRPO's groups stay whole. Metrics
    count what was dropped and how stale the batch was."""
    staleness = policy_step - versions.long()
    if n > 1:
        if versions.numel() % n:
            raise ValueError(f"{versions.numel()} samples do not split into groups of n={n}")
        staleness = staleness.view(-1, n).max(dim=1, keepdim=True).values.expand(-1, n).reshape(-1)
    keep = torch.ones_like(staleness, dtype=torch.bool) if max_staleness is None else staleness <= max_staleness
    metrics = {"staleness/max_sampled": float(staleness.max().item()) if staleness.numel() else 0.0,
               "staleness/dropped": float((~keep).sum().item())}
    return keep, metrics


@dataclass
class DynamicBatch:
    """Collects informative groups over sampling rounds (DAPO Algorithm 1, line 6: "sample until the
    batch is full"): round 0 is the step's own prompts, up to `max_rounds` more may follow. A round
    whose informative groups overflow the target gives only as many as are missing; the rest, and
    every uninformative group, count as generated but unused in the token ledger."""
    target: int  # informative groups wanted (prompts_per_step)
    max_rounds: int  # extra rounds allowed after the first; 0 = dynamic sampling off
    tol: float = 0.0
    rounds: int = 0
    groups: int = 0
    sampled_groups: int = 0
    informative: int = 0
    tokens_generated: float = 0.0
    tokens_kept: float = 0.0
    taken: list[torch.Tensor] = field(default_factory=list)  # per round: indices of the groups taken

    def add(self, rewards: torch.Tensor,  # [G, n] this round's rewards
            group_tokens: torch.Tensor,  # [G] completion tokens generated per group
            ) -> torch.Tensor:
        """Record a round; returns the indices (into this round's G groups) to train on."""
        good = informative_groups(rewards, self.tol).nonzero().squeeze(1)
        take = good[:max(self.target - self.groups, 0)]
        self.rounds += 1
        self.sampled_groups += rewards.shape[0]
        self.informative += len(good)
        self.groups += len(take)
        self.tokens_generated += float(group_tokens.sum().item())
        self.tokens_kept += float(group_tokens[take].sum().item())
        self.taken.append(take)
        return take

    def needs_more(self) -> bool:
        """Another round is due: short of the target, and a round is left."""
        return self.groups < self.target and self.rounds <= self.max_rounds

    def metrics(self) -> dict[str, float]:
        return {"sampling/rounds": float(self.rounds), "sampling/groups_sampled": float(self.sampled_groups),
                "sampling/groups_informative": float(self.informative), "sampling/groups_kept": float(self.groups),
                "sampling/batch_full": float(self.groups >= self.target),
                "tokens/generated_all_rounds": self.tokens_generated,
                "tokens/unused": self.tokens_generated - self.tokens_kept}
