"""GroupDPO (algorithms.md §1.3 ablation): the DPO loss averaged over every (better, worse) pair of a
group instead of one sampled pair."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..rollout.logprobs import token_logprobs
from ..rollout.types import Rollouts
from .dpo import sequence_logps
from .objective import BatchContext, TrainBatch, spread_groups


def group_dpo_loss(
    logps: torch.Tensor,  # [G, n] summed policy log-probs of every response
    ref_logps: torch.Tensor,  # [G, n]
    rewards: torch.Tensor,  # [G, n]
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GroupDPO (§1.3 ablation): the DPO loss averaged over every (better, worse) pair of a group,
    then over groups that have at least one such pair. Returns the sum over groups; the caller
    divides by the number of groups in the whole batch."""
    delta = logps - ref_logps  # [G, n]
    margin = beta * (delta[:, :, None] - delta[:, None, :])  # [G, i, j]: i preferred over j
    better = (rewards[:, :, None] > rewards[:, None, :]).to(logps.dtype)
    count = better.sum(dim=(1, 2))
    per_group = (-F.logsigmoid(margin) * better).sum(dim=(1, 2)) / count.clamp(min=1)
    has_pair = count > 0
    loss = per_group[has_pair].sum() if has_pair.any() else logps.sum() * 0.0
    with torch.no_grad():
        acc = ((margin > 0).to(logps.dtype) * better).sum() / better.sum().clamp(min=1)
    return loss, {"dpo/pairs": better.sum().item(), "dpo/accuracy": acc.item()}


@dataclass
class GroupMicro:
    rollouts: Rollouts  # [k·n]: whole groups
    ref_logps: torch.Tensor  # [k·n, T]
    rewards: torch.Tensor  # [k, n]
    num_groups: int  # groups with a pair in the whole batch (the mean's denominator)


class GroupDPOObjective:
    passes = 1
    needs_reference = True

    def __init__(self, cfg):
        self.cfg = cfg

    def make_batch(self, rollouts: Rollouts, rewards: torch.Tensor, ctx: BatchContext) -> TrainBatch:
        G, n = rewards.shape
        keep = spread_groups(rewards).nonzero().squeeze(1).cpu()
        batch = TrainBatch(metrics={"groups/skipped": float(G - len(keep))})
        trained = 0.0
        for chunk in keep.split(max(1, ctx.micro_batch // n)):
            rows = (chunk[:, None] * n + torch.arange(n)).reshape(-1)
            mb = rollouts.select(rows)
            ref = ctx.reference(rows)[:, :mb.completion_ids.shape[1]]
            batch.micro.append(GroupMicro(mb, ref, rewards[chunk.to(rewards.device)], len(keep)))
            trained += float(mb.completion_mask.sum().item())
        batch.metrics["tokens/trained"] = trained
        return batch

    def loss(self, policy: torch.nn.Module, m: GroupMicro) -> tuple[torch.Tensor, dict[str, float]]:
        n = m.rewards.shape[1]
        lengths = m.rollouts.completion_mask.sum(dim=1).clamp(min=1)
        ref_seq = sequence_logps(m.ref_logps, lengths, self.cfg.length_normalize).view(-1, n)
        seq = sequence_logps(token_logprobs(policy, m.rollouts)[0], lengths, self.cfg.length_normalize).view(-1, n)
        loss, metrics = group_dpo_loss(seq, ref_seq, m.rewards.to(seq.device), self.cfg.beta)
        return loss / m.num_groups, metrics
