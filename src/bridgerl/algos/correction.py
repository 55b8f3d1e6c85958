"""Train/infer mismatch: the generator (HF decode path, vLLM, bf16) and the trainer give the same
tokens slightly different log-probs, so "on-policy" samples are a little off-policy. This module
measures the gap and turns it into per-token weights for the policy loss. Pure tensor math.

Conventions, as in TRL (`vllm_importance_sampling_mode`) and verl (`rollout_correction`): the
correction ratio is r = π_train(y_t) / π_gen(y_t), with π_train the trainer's log-probs of the
weights that generated (detached) and π_gen the generator's recorded ones; the weights multiply the
policy term of the loss and carry no gradient.

  token_tis  truncated importance sampling per token, w_t = min(r_t, C) (TRL token_truncate,
             verl rollout_is=token). Tokens the generator over-sampled (r < 1) are down-weighted;
             the cap C bounds the variance.
  seq_mask   rejection per sequence: the sequence is dropped (w = 0 on all its tokens) when its
             geometric-mean ratio exp(mean_t log r_t) leaves [1/C, C]; otherwise w = 1. This is
             verl's rollout_rs=geometric; TRL's sequence_mask uses the product of the ratios
             instead, which grows with length, so one threshold cannot serve short and long replies.
"""
from __future__ import annotations

import torch

from .policy_loss import k3_kl

MODES = ("none", "token_tis", "seq_mask")


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask > 0]


def mismatch_metrics(train_logps: torch.Tensor,  # [S, T] trainer log-probs of the sampled tokens
                     gen_logps: torch.Tensor,  # [S, T] generator's recorded log-probs
                     mask: torch.Tensor,  # [S, T] 1 on completion tokens
                     ) -> dict[str, float]:
    """How far the generator's numbers are from the trainer's, per completion token.

    mismatch/kl: KL(π_gen ‖ π_train) estimated on the generator's own samples with k3
    (r − 1 − log r, r = π_train/π_gen; ≥ 0, unbiased), token mean; mismatch/k1: the plain
    log π_gen − log π_train, token mean (unbiased too, but can go negative); mismatch/max: max |Δ log π|."""
    train = train_logps.detach().float()
    gen = gen_logps.detach().float()
    delta = _masked(gen - train, mask)
    if delta.numel() == 0:
        return {"mismatch/kl": 0.0, "mismatch/k1": 0.0, "mismatch/max": 0.0}
    k3 = _masked(k3_kl(gen, train), mask)  # k3_kl(logps=gen, ref=train) = e^{train−gen} − (train−gen) − 1
    return {"mismatch/kl": k3.mean().item(), "mismatch/k1": delta.mean().item(),
            "mismatch/max": delta.abs().max().item()}


def _distribution(prefix: str, ratio: torch.Tensor) -> dict[str, float]:
    if ratio.numel() == 0:
        return {}
    out = {f"{prefix}/mean": ratio.mean().item(), f"{prefix}/min": ratio.min().item(),
           f"{prefix}/max": ratio.max().item()}
    if ratio.numel() <= 16_000_000:  # torch.quantile's input limit; a step's tokens are far fewer
        q = torch.quantile(ratio.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64, device=ratio.device))
        out |= {f"{prefix}/p05": q[0].item(), f"{prefix}/p50": q[1].item(), f"{prefix}/p95": q[2].item()}
    return out


def rollout_correction(mode: str,
                       train_logps: torch.Tensor,  # [S, T] detached trainer log-probs (the generating weights)
                       gen_logps: torch.Tensor,  # [S, T] generator's recorded log-probs
                       mask: torch.Tensor,  # [S, T]
                       threshold: float,  # C > 1
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights [S, T] (detached, 0 on padding) and their metrics: the ratio's
    distribution (mean, min, max, 5/50/95th percentiles) and the share truncated or masked."""
    if mode not in MODES:
        raise ValueError(f"unknown algo.rollout_correction {mode!r}; use one of {', '.join(MODES)}")
    if threshold <= 1:
        raise ValueError(f"algo.correction_threshold must exceed 1 (got {threshold}): it bounds the ratio to [1/C, C]")
    maskf = (mask > 0).to(train_logps.dtype)
    log_ratio = (train_logps.detach() - gen_logps.detach()) * maskf
    if mode == "none":
        return maskf.clone(), {}
    if mode == "token_tis":
        ratio = torch.exp(log_ratio)
        weights = ratio.clamp(max=threshold) * maskf
        tokens = _masked(ratio, mask)
        truncated = (tokens > threshold).float().mean().item() if tokens.numel() else 0.0
        return weights, _distribution("correction/ratio", tokens) | {"correction/truncated_frac": truncated}
    present = maskf.sum(dim=1) > 0
    seq_ratio = torch.exp(log_ratio.sum(dim=1) / maskf.sum(dim=1).clamp(min=1))
    keep = (seq_ratio >= 1.0 / threshold) & (seq_ratio <= threshold)
    weights = keep[:, None].to(maskf.dtype) * maskf
    kept_tokens = float(weights.sum().item())
    total_tokens = float(maskf.sum().item())
    seqs = seq_ratio[present]
    masked = (~keep[present]).float().mean().item() if seqs.numel() else 0.0
    return weights, _distribution("correction/seq_ratio", seqs) | {
        "correction/masked_frac": masked,
        "correction/masked_token_frac": 1.0 - kept_tokens / total_tokens if total_tokens else 0.0}


def old_logps_and_weights(train_logps: torch.Tensor,  # [S, T] the trainer's log-probs, first pass of the batch
                          gen_logps: torch.Tensor,  # [S, T] the generator's recorded log-probs
                          mask: torch.Tensor,  # [S, T]
                          fresh: bool,  # the generator held the policy's current weights
                          mode: str, threshold: float,
                          ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """What a GRPO micro-batch uses as π_old, its correction weights, and the mismatch metrics.

    Fresh samples: π_old is the trainer's own (detached) log-probs, so the PPO ratio is exactly 1
    on the first update, and the generator's numbers enter only through the correction weights;
    the gap between the two is pure train/infer mismatch and is logged. Stale samples: π_old is
    the generator's log-probs, whose ratio already corrects staleness and mismatch together (the
    trainer no longer holds the generating weights, so the two cannot be told apart); no weights."""
    if not fresh:
        return gen_logps, None, {}
    old = train_logps.detach()
    metrics = mismatch_metrics(old, gen_logps, mask)
    if mode == "none":
        return old, None, metrics
    weights, cm = rollout_correction(mode, old, gen_logps, mask, threshold)
    return old, weights, metrics | cm
