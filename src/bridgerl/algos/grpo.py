"""GRPO (algorithms.md §1.4): group-normalised advantages and the clipped / truncated policy-gradient
loss with k3 KL as pure functions of tensors, and the objective that feeds them micro-batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rollout.logprobs import group_chunks, token_logprobs
from ..rollout.types import Rollouts
from . import correction
from . import policy_loss as variants
from .objective import BatchContext, TrainBatch, spread_groups, spread_rows


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [G, n] → advantages [G, n]: (r − mean) / (unbiased std + eps). All-equal groups give 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator e^{ℓ_ref−ℓ} − (ℓ_ref − ℓ) − 1 ≥ 0, zero iff equal."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1.0


def grpo_loss(
    logps: torch.Tensor,  # [S, T] policy log-probs of the sampled tokens (with grad)
    old_logps: torch.Tensor,  # [S, T] log-probs of the policy that sampled them (generator)
    advantages: torch.Tensor,  # [S]
    mask: torch.Tensor,  # [S, T] 1 on completion tokens
    ref_logps: torch.Tensor | None = None,  # [S, T]; None skips the KL term
    beta: float = 0.0,
    importance: str = "clip",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    truncate_max: float = 2.0,
    aggregation: str = "sum",
    n: int = 1,
    normalizer: float | None = None,
    token_weights: torch.Tensor | None = None,  # [S, T] detached per-token weights (rollout correction)
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO surrogate over S sequences, to be minimised.

    The ratio π_θ/π_old corrects stale samples: "clip" is PPO's min(ρA, clip(ρ)A); "truncate"
    weights the plain policy gradient by min(ρ, C) (detached). On-policy (old = θ) both reduce to
    the paper's A·∇log π. Aggregation "sum": tokens summed, mean over a group's n rollouts, summed
    over prompts (§1.4: divide by n); "token_mean": over all tokens; "seq_mean": token-mean per sequence, then
    mean. `normalizer` overrides the denominator so micro-batches add up to the full batch's loss.
    `clip_eps_high` (DAPO's clip-higher) widens the upper side of the clip range; None keeps it
    symmetric. `token_weights` multiply the policy term per token (train/infer mismatch correction,
    algos/correction.py); the KL term is not reweighted, as TRL does.
    """
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(logps.dtype)
    if importance == "clip":
        high = clip_eps if clip_eps_high is None else clip_eps_high
        per_token = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
        outside = (ratio - 1).abs() > clip_eps if clip_eps_high is None else (ratio < 1 - clip_eps) | (ratio > 1 + high)
        clipped = outside & (mask > 0)
    else:
        per_token = ratio.detach().clamp(max=truncate_max) * adv * logps
        clipped = (ratio > truncate_max) & (mask > 0)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else None
    if kl is not None and beta:
        per_token = per_token - beta * kl
    if aggregation == "sum":
        total = (per_token * mask).sum()
        denom = float(n)
    elif aggregation == "token_mean":
        total = (per_token * mask).sum()
        denom = mask.sum().clamp(min=1).item()
    elif aggregation == "seq_mean":
        total = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
        denom = float(mask.shape[0])
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; use sum, token_mean or seq_mean")
    loss = -total / (normalizer if normalizer is not None else denom)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        metrics = {
            "ratio/mean": ((ratio * mask).sum() / tokens).item(),
            "ratio/max": ratio.masked_fill(mask == 0, 0).max().item() if mask.numel() else 1.0,
            "ratio/clipped_frac": (clipped.sum() / tokens).item(),
        }
        if kl is not None:
            metrics["kl"] = ((kl * mask).sum() / tokens).item()
    return loss, metrics


@dataclass
class GRPOMicro:
    rollouts: Rollouts  # [k] rows of whole groups
    advantages: torch.Tensor  # [k]
    ref_logps: torch.Tensor | None  # [k, T]; None without a KL term
    on_policy: bool  # the generator held the policy's current weights
    normalizer: float  # the whole batch's denominator, so micro-batch losses add up to the batch loss
    settings: variants.LossSettings
    old_logps: torch.Tensor | None = None  # [k, T] π_old, fixed by the first pass (correction.old_logps_and_weights)
    weights: torch.Tensor | None = None  # [k, T] train/infer mismatch correction, fixed by the first pass


class GRPOObjective:
    """Groups with a reward spread train; the others carry no gradient and are counted as skipped.
    `algo.loss` picks the policy loss (algos/policy_loss.py), `algo.rollout_correction` the
    mismatch weights (algos/correction.py)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.passes = cfg.updates_per_batch
        self.needs_reference = cfg.beta > 0

    def make_batch(self, rollouts: Rollouts, rewards: torch.Tensor, ctx: BatchContext) -> TrainBatch:
        cfg = self.cfg
        G, n = rewards.shape
        if cfg.loss == "dr_grpo" and not ctx.max_new_tokens:
            raise ValueError("algo.loss=dr_grpo divides by max_new_tokens × sequences: the BatchContext must carry "
                             "max_new_tokens (rollout.max_new_tokens)")
        settings = variants.LossSettings.from_config(cfg, n=n, max_new_tokens=ctx.max_new_tokens or 0)
        keep = spread_groups(rewards)
        batch = TrainBatch(metrics={
            "groups/skipped": float(G - keep.sum().item()),
            "tokens/skipped": float(rollouts.completion_mask.view(G, n, -1)[~keep.to(rollouts.completion_mask.device)].sum().item())})
        rows = spread_rows(rewards)
        if rows.numel() == 0:
            return batch
        kept = rollouts.select(rows)
        adv = variants.advantages(rewards, settings).reshape(-1)[rows.to(rewards.device)]
        ref = ctx.reference(rows) if cfg.beta > 0 else None
        # Dr.GRPO's constant counts every sequence of the step, as TRL's dr_grpo does.
        normalizer = variants.denominator(kept.completion_mask, settings, sequences=G * n)
        # On-policy (the generator holds this very policy) the ratio is exactly 1: old = current,
        # detached, with no extra forward. Stale samples are corrected against the sampler's log-probs.
        on_policy = bool((kept.versions == ctx.policy_version).all())
        for chunk in group_chunks(rows, kept.lengths, ctx.micro_batch, n):
            mb = kept.select(chunk)
            width = mb.completion_ids.shape[1]
            batch.micro.append(GRPOMicro(
                mb, adv[chunk.to(adv.device)], None if ref is None else ref[chunk.to(ref.device), :width],
                on_policy, normalizer, settings))
        batch.metrics["tokens/trained"] = float(kept.completion_mask.sum().item())
        return batch

    def loss(self, policy: torch.nn.Module, m: GRPOMicro) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        logps, _ = token_logprobs(policy, m.rollouts)
        mask = m.rollouts.completion_mask
        first = {}
        if m.old_logps is None:  # first pass: fix π_old and the correction weights for every pass
            if m.rollouts.sampled:
                m.old_logps, m.weights, first = correction.old_logps_and_weights(
                    logps, m.rollouts.gen_logprobs, mask, m.on_policy, cfg.rollout_correction,
                    cfg.correction_threshold)
            else:  # rebuilt from stored tokens: no sampler numbers to compare or correct with
                m.old_logps = logps.detach() if m.on_policy else m.rollouts.gen_logprobs
        loss, metrics = variants.policy_loss(logps, m.old_logps, m.advantages, mask, m.settings,
                                             ref_logps=m.ref_logps, normalizer=m.normalizer, token_weights=m.weights)
        return loss, metrics | first
