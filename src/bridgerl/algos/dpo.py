"""DPO: pair building and the loss (algorithms.md §1.3). Pure functions of tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
