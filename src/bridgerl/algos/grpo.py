"""GRPO (algorithms.md §1.4): the objective that turns groups into micro-batches and trains the
configured policy loss on them. The pure math (group advantages, the clipped / truncated surrogate,
k3 KL, and the variants of `algo.loss`) is in policy_loss.py; mismatch correction in correction.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rollout.logprobs import group_chunks, token_logprobs
from ..rollout.types import Rollouts
from . import correction
from . import policy_loss as variants
from .policy_loss import group_advantages, grpo_loss, k3_kl  # noqa: F401  (GRPO's pure math, re-exported)
from .objective import BatchContext, TrainBatch, spread_groups, spread_rows


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
