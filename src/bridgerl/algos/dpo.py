"""DPO (algorithms.md §1.3): pair building and the loss as pure functions of tensors, and the
objective that turns groups of rollouts into pairs, micro-batches and that loss (+ NLL / entropy)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..rollout.logprobs import token_logprobs
from ..rollout.types import Rollouts
from .objective import BatchContext, TrainBatch


def build_pairs(rewards: torch.Tensor, binary: torch.Tensor, generator: torch.Generator | None = None):
    """Pick one (chosen, rejected) pair per group.

    rewards: [G, n] float; binary: [G] bool, True where the group's reward is verifiable 0/1.
    Binary groups pair a random correct with a random incorrect response; other groups pair
    best with worst. Groups whose rewards are all equal get no pair.
    Returns (valid [G] bool, chosen [G] long, rejected [G] long); indices are within the group.
    """
    G, n = rewards.shape
    best = rewards.argmax(dim=1)
    worst = rewards.argmin(dim=1)
    valid = rewards.max(dim=1).values > rewards.min(dim=1).values
    if binary.any():
        # A random member of the top class and of the bottom class: random keys, masked argmax.
        keys = torch.rand(G, n, generator=generator)
        top = rewards == rewards.max(dim=1, keepdim=True).values
        bottom = rewards == rewards.min(dim=1, keepdim=True).values
        rand_best = torch.where(top, keys, -1.0).argmax(dim=1)
        rand_worst = torch.where(bottom, keys, -1.0).argmax(dim=1)
        best = torch.where(binary, rand_best, best)
        worst = torch.where(binary, rand_worst, worst)
    return valid, best, worst


def dpo_losses(
    chosen_logps: torch.Tensor,  # [P] summed policy log-probs of the chosen responses
    rejected_logps: torch.Tensor,  # [P]
    ref_chosen_logps: torch.Tensor,  # [P]
    ref_rejected_logps: torch.Tensor,  # [P]
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss −log σ(β(Δ_c − Δ_r)) and the implicit reward margin β(Δ_c − Δ_r)."""
    margin = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(margin), margin


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,  # [P] per-pair weights (wDPO); detached
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO loss over P pairs, optionally weighted per pair. An empty batch gives loss 0 with a graph."""
    losses, margin = dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    if weights is not None:
        losses = losses * weights.detach()
    if losses.numel() == 0:
        return chosen_logps.sum() * 0.0, {"dpo/pairs": 0.0}
    loss = losses.sum() if reduction == "sum" else losses.mean()
    with torch.no_grad():
        metrics = {
            "dpo/pairs": float(losses.numel()),
            "dpo/margin": margin.mean().item(),
            "dpo/accuracy": (margin > 0).float().mean().item(),
            "rewards/chosen": (beta * (chosen_logps - ref_chosen_logps)).mean().item(),
            "rewards/rejected": (beta * (rejected_logps - ref_rejected_logps)).mean().item(),
        }
    return loss, metrics


def sequence_logps(token_logps: torch.Tensor, lengths: torch.Tensor, normalize: bool) -> torch.Tensor:
    """[S, T] → [S]: summed over tokens (the paper's default) or their mean."""
    summed = token_logps.sum(dim=1)
    return summed / lengths if normalize else summed


@dataclass
class DPOMicro:
    rollouts: Rollouts  # [2k]: the k chosen rows, then their k rejected rows
    ref_logps: torch.Tensor  # [2k, T] reference token log-probs of the same rows
    gaps: torch.Tensor  # [k] reward gaps r(chosen) − r(rejected) > 0
    num_pairs: int  # P, the pairs of the whole batch (the mean's denominator)
    weights: torch.Tensor | None = None  # [k] per-pair weights (OPTune's wDPO), detached


class DPOObjective:
    """One (chosen, rejected) pair per group: random correct-vs-incorrect for binary tasks, best-vs-worst
    otherwise (`algo.pairs`); groups whose rewards are all equal give no pair."""

    passes = 1
    needs_reference = True

    def __init__(self, cfg):
        self.cfg = cfg

    def make_batch(self, rollouts: Rollouts, rewards: torch.Tensor, ctx: BatchContext) -> TrainBatch:
        G, n = rewards.shape
        binary = ctx.binary if self.cfg.pairs == "auto" else torch.full_like(ctx.binary, self.cfg.pairs == "random")
        valid, chosen, rejected = build_pairs(rewards.cpu(), binary.cpu(), ctx.rng)
        groups = valid.nonzero().squeeze(1)
        batch = TrainBatch(metrics={"groups/skipped": float(G - len(groups))})
        if len(groups) == 0:
            return batch
        P = len(groups)
        chosen_rows, rejected_rows = groups * n + chosen[groups], groups * n + rejected[groups]
        gaps = rewards.cpu()[groups, chosen[groups]] - rewards.cpu()[groups, rejected[groups]]
        ref = ctx.reference(torch.cat([chosen_rows, rejected_rows]))  # [2P, T]: one pass for the batch
        trained = 0.0
        for chunk in torch.arange(P).split(max(1, ctx.micro_batch // 2)):
            mb = rollouts.select(torch.cat([chosen_rows[chunk], rejected_rows[chunk]]))
            width = mb.completion_ids.shape[1]
            ref_mb = torch.cat([ref[chunk.to(ref.device)], ref[(chunk + P).to(ref.device)]])[:, :width]
            batch.micro.append(DPOMicro(mb, ref_mb, gaps[chunk], P))
            trained += float(mb.completion_mask.sum().item())
        batch.metrics |= {"dpo/pairs": float(P), "tokens/trained": trained}
        return batch

    def loss(self, policy: torch.nn.Module, m: DPOMicro) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, k = self.cfg, len(m.gaps)
        lengths = m.rollouts.completion_mask.sum(dim=1).clamp(min=1)
        need_entropy = cfg.entropy_coef > 0
        logps, entropy = token_logprobs(policy, m.rollouts, with_entropy=need_entropy)
        seq = sequence_logps(logps, lengths, cfg.length_normalize)
        ref_seq = sequence_logps(m.ref_logps, lengths, cfg.length_normalize)
        loss, metrics = dpo_loss(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], cfg.beta, weights=m.weights,
                                 reduction="sum")
        if cfg.reduction == "mean":
            loss = loss / m.num_pairs
        if cfg.nll_coef:  # λ_NLL · NLL(y_c) / #tokens
            loss = loss + cfg.nll_coef * (-(logps[:k].sum(dim=1) / lengths[:k])).sum() / m.num_pairs
        if need_entropy:  # − c_H · H̄ of the chosen response
            loss = loss - cfg.entropy_coef * (entropy[:k].sum(dim=1) / lengths[:k]).sum() / m.num_pairs
        return loss, metrics
