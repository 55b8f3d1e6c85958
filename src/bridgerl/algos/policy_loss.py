"""GRPO-family policy losses, chosen by `algo.loss`: grpo | dr_grpo | dapo | gspo | cispo, and GRPO's
own pure math (algorithms.md §1.4: group advantages, the surrogate with k3 KL).

Each variant differs from GRPO in at most three places — the advantage (std
normalisation or not), the per-token or per-sequence objective, and the denominator it is
aggregated by — so each is one function here over the shared `grpo_loss` and
`group_advantages`. Pure tensor math: log-probs, advantages and masks in, `(loss, metrics)` out.

  grpo     the configured GRPO (importance clip|truncate, aggregation sum|token_mean|seq_mean);
           the default, and numerically today's GRPO.
  dapo     Yu et al. 2025 (arXiv 2503.14476), eq. 8: PPO clip with a wider upper side
           [1 − ε_low, 1 + ε_high] ("clip-higher"), summed over every token of the batch and
           divided by the batch's token count ("token-level policy-gradient loss").
  dr_grpo  Liu et al. 2025 (arXiv 2503.20783), "Understanding R1-Zero-like training": the advantage
           is r − mean(r) with no std division, and the 1/|o_i| length normaliser becomes a
           constant, here max_new_tokens × sequences, so a batch's loss scale does not depend on
           how many tokens it holds.
  gspo     Zheng et al. 2025 (arXiv 2507.18071), eq. 5–7: one ratio per sequence,
           s_i = (π_θ(y_i)/π_old(y_i))^{1/|y_i|} = exp(mean_t log r_{i,t}), clipped PPO-style with its
           own, much narrower range (the paper: 3e-4 / 4e-4), averaged over sequences.
  cispo    MiniMax-M1 (arXiv 2506.13585), eq. 4–5: every token keeps its gradient, weighted by the
           detached, clipped IS weight sg(min(r, C))·A·log π (C = 1 + ε_high^IS; no lower bound, as
           the paper sets ε_low^IS large), token-level mean as DAPO.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


LOSSES = ("grpo", "dr_grpo", "dapo", "gspo", "cispo")


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


@dataclass(frozen=True)
class LossSettings:
    """The knobs a policy loss reads, gathered from `algo` (GRPOConfig) and the rollout config so
    that the math below sees numbers, not config objects. Defaults live in config.py only."""
    loss: str
    beta: float
    normalize_std: bool
    importance: str
    clip_eps: float
    clip_eps_high: float | None
    gspo_clip_eps: float
    gspo_clip_eps_high: float
    truncate_max: float
    aggregation: str
    n: int  # samples per prompt
    max_new_tokens: int  # Dr.GRPO's constant length normaliser

    @classmethod
    def from_config(cls, algo, n: int, max_new_tokens: int) -> "LossSettings":
        return cls(loss=algo.loss, beta=algo.beta, normalize_std=algo.normalize_std, importance=algo.importance,
                   clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high, gspo_clip_eps=algo.gspo_clip_eps,
                   gspo_clip_eps_high=algo.gspo_clip_eps_high, truncate_max=algo.truncate_max,
                   aggregation=algo.aggregation, n=n, max_new_tokens=max_new_tokens)


def _check(name: str) -> None:
    if name not in LOSSES:
        raise ValueError(f"unknown algo.loss {name!r}; use one of {', '.join(LOSSES)}")


def advantages(rewards: torch.Tensor, s: LossSettings) -> torch.Tensor:
    """rewards [G, n] → advantages [G, n]. Dr.GRPO drops the std division (its question-level
    difficulty bias); every other variant follows `normalize_std`."""
    _check(s.loss)
    return group_advantages(rewards, normalize_std=s.normalize_std and s.loss != "dr_grpo")


def denominator(mask: torch.Tensor, s: LossSettings, sequences: int | None = None) -> float:
    """What the whole step's loss is divided by, from the mask [S, T] of every row the step trains
    on: micro-batches pass it as `normalizer` so their losses add up to the full batch's.
    `sequences` (Dr.GRPO) counts the step's sequences if more than the trained rows (e.g. with the
    zero-advantage groups that were dropped but still belong to the batch)."""
    _check(s.loss)
    S = mask.shape[0] if sequences is None else sequences
    tokens = float(mask.sum().clamp(min=1).item())
    if s.loss in ("dapo", "cispo"):
        return tokens
    if s.loss == "dr_grpo":
        return float(max(S, 1) * s.max_new_tokens)
    if s.loss == "gspo":
        return float(max(S, 1))
    return {"sum": float(s.n), "token_mean": tokens, "seq_mean": float(max(S, 1))}[s.aggregation]


def grpo_variant(logps, old_logps, adv, mask, s: LossSettings, ref_logps=None, normalizer=None, token_weights=None):
    """Today's GRPO: the configured importance and aggregation, unchanged."""
    return grpo_loss(logps, old_logps, adv, mask, ref_logps, beta=s.beta, importance=s.importance,
                     clip_eps=s.clip_eps, clip_eps_high=s.clip_eps_high, truncate_max=s.truncate_max,
                     aggregation=s.aggregation, n=s.n, normalizer=normalizer, token_weights=token_weights)


def dapo_loss(logps, old_logps, adv, mask, s: LossSettings, ref_logps=None, normalizer=None, token_weights=None):
    """DAPO: clip-higher PPO objective, token-level mean over the batch."""
    return grpo_loss(logps, old_logps, adv, mask, ref_logps, beta=s.beta, importance="clip", clip_eps=s.clip_eps,
                     clip_eps_high=s.clip_eps_high, aggregation="token_mean",
                     normalizer=normalizer if normalizer is not None else denominator(mask, s),
                     token_weights=token_weights)


def dr_grpo_loss(logps, old_logps, adv, mask, s: LossSettings, ref_logps=None, normalizer=None, token_weights=None):
    """Dr.GRPO: PPO clip, tokens summed and divided by the constant max_new_tokens × sequences
    (advantages without std come from `advantages`)."""
    return grpo_loss(logps, old_logps, adv, mask, ref_logps, beta=s.beta, importance="clip", clip_eps=s.clip_eps,
                     clip_eps_high=s.clip_eps_high, aggregation="sum",
                     normalizer=normalizer if normalizer is not None else denominator(mask, s),
                     token_weights=token_weights)


def cispo_loss(logps, old_logps, adv, mask, s: LossSettings, ref_logps=None, normalizer=None, token_weights=None):
    """CISPO: sg(min(r, C))·A·log π on every token (grpo_loss's "truncate" objective), token mean."""
    return grpo_loss(logps, old_logps, adv, mask, ref_logps, beta=s.beta, importance="truncate",
                     truncate_max=s.truncate_max, aggregation="token_mean",
                     normalizer=normalizer if normalizer is not None else denominator(mask, s),
                     token_weights=token_weights)


def sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[S]: mean over a sequence's tokens of log π_θ − log π_old, i.e. log of the geometric mean
    of the token ratios (GSPO's length-normalised sequence ratio)."""
    mask = mask.to(logps.dtype)
    return ((logps - old_logps) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def gspo_loss(logps, old_logps, adv, mask, s: LossSettings, ref_logps=None, normalizer=None, token_weights=None):
    """GSPO: min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i) per sequence, mean over sequences.
    Token weights (mismatch correction) and the k3 KL enter as their per-sequence token means."""
    maskf = mask.to(logps.dtype)
    lengths = maskf.sum(dim=1).clamp(min=1)
    ratio = torch.exp(sequence_log_ratio(logps, old_logps, mask))
    a = adv.to(logps.dtype)
    lo, hi = s.gspo_clip_eps, s.gspo_clip_eps_high
    per_seq = torch.minimum(ratio * a, ratio.clamp(1 - lo, 1 + hi) * a)
    if token_weights is not None:
        per_seq = per_seq * ((token_weights.detach().to(logps.dtype) * maskf).sum(dim=1) / lengths)
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else None
    if kl is not None and s.beta:
        per_seq = per_seq - s.beta * (kl * maskf).sum(dim=1) / lengths
    denom = normalizer if normalizer is not None else denominator(mask, s)
    loss = -per_seq.sum() / denom
    with torch.no_grad():
        present = mask.sum(dim=1) > 0
        count = present.sum().clamp(min=1)
        clipped = ((ratio < 1 - lo) | (ratio > 1 + hi)) & present
        metrics = {
            "ratio/mean": (ratio * present).sum().div(count).item(),
            "ratio/max": ratio.masked_fill(~present, 0).max().item() if ratio.numel() else 1.0,
            "ratio/clipped_frac": (clipped.sum() / count).item(),
        }
        if kl is not None:
            metrics["kl"] = ((kl * maskf).sum() / maskf.sum().clamp(min=1)).item()
    return loss, metrics


VARIANTS: dict[str, Callable] = {"grpo": grpo_variant, "dr_grpo": dr_grpo_loss, "dapo": dapo_loss,
                                 "gspo": gspo_loss, "cispo": cispo_loss}


def policy_loss(logps: torch.Tensor,  # [S, T] with grad
                old_logps: torch.Tensor,  # [S, T] the sampling policy's log-probs (detached)
                adv: torch.Tensor,  # [S] one advantage per sequence
                mask: torch.Tensor,  # [S, T] 1 on completion tokens
                s: LossSettings,
                ref_logps: torch.Tensor | None = None,
                normalizer: float | None = None,  # `denominator(...)` of the whole step, for micro-batches
                token_weights: torch.Tensor | None = None,  # [S, T] mismatch correction (algos/correction.py)
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss `s.loss` names, to be minimised."""
    _check(s.loss)
    return VARIANTS[s.loss](logps, old_logps, adv, mask, s, ref_logps=ref_logps, normalizer=normalizer,
                            token_weights=token_weights)
