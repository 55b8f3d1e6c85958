"""The GRPO update on N ranks: train/updates.grpo_update with micro-batch i on rank i mod N.

Every rank holds the whole batch and builds the same micro-batch list, the normalizers are batch-wide
and gradients are summed across ranks (fsdp.shard_model), so the step equals the single-process step
on the same rollouts. A rank with fewer micro-batches runs zero-weighted passes to keep FSDP's
collectives in step; the loss and metrics are gathered so every rank returns the same numbers."""
from __future__ import annotations

from typing import Callable

import torch

from ..algos.grpo import group_advantages, grpo_loss
from ..rollout.types import Rollouts
from ..train.logprobs import token_logprobs
from ..train.updates import _mean_metrics, grpo_chunks, spread_rows
from .fsdp import all_reduce_sum, gather_objects, rank_and_world, rank_share


def zero_pass(policy, batch: Rollouts) -> None:
    """A forward and backward that adds nothing to any gradient but runs FSDP's all-gathers and
    reduce-scatters, so a rank without a micro-batch keeps pace with its peers."""
    logps, _ = token_logprobs(policy, batch.select(torch.arange(1)))
    (logps.sum() * 0.0).backward()


def grpo_update_sharded(policy, reference, batch: Rollouts, rewards: torch.Tensor, algo, micro_batch: int,
                        policy_version: int, step_fn: Callable[[], dict],
                        ref_logps: torch.Tensor | None = None) -> dict:
    """Same arguments and metrics as train.updates.grpo_update; call it on every rank with the same batch."""
    rank, world = rank_and_world()
    G, n = rewards.shape
    advantages = group_advantages(rewards, algo.normalize_std)
    keep = rewards.max(dim=1).values > rewards.min(dim=1).values
    metrics = {"groups/skipped": float(G - keep.sum().item()),
               "tokens/skipped": float(batch.completion_mask.view(G, n, -1)[~keep].sum().item())}
    rows = spread_rows(rewards)
    if rows.numel() == 0:  # the same decision on every rank: all hold the same rewards
        return metrics | {"loss": 0.0, "tokens/trained": 0.0, "update/skipped": 1.0}
    kept = batch.select(rows)
    adv = advantages.reshape(-1)[rows.to(advantages.device)]
    chunks = grpo_chunks(rows, kept.lengths, micro_batch, n)
    mine = rank_share(list(range(len(chunks))), rank, world)
    parts = {i: kept.select(chunks[i]) for i in mine if i is not None}
    ref: dict[int, torch.Tensor | None] = {i: None for i in parts}
    if algo.beta > 0:
        for i, mb in parts.items():
            if ref_logps is not None:
                ref[i] = ref_logps[rows[chunks[i].to(rows.device)], :mb.completion_ids.shape[1]]
            else:
                with torch.no_grad():
                    ref[i] = token_logprobs(reference, mb)[0]
    normalizer = {"sum": float(n), "token_mean": float(kept.completion_mask.sum().item()),
                  "seq_mean": float(len(rows))}[algo.aggregation]
    fresh = bool((kept.versions == policy_version).all())
    old: dict[int, torch.Tensor | None] = {i: (None if fresh else mb.gen_logprobs) for i, mb in parts.items()}
    micro, steps = [], []  # loss metrics of this rank's micro-batches; the optimizer steps' (same on all ranks)
    for _ in range(algo.updates_per_batch):
        local = 0.0
        for i in mine:
            if i is None:
                zero_pass(policy, kept)
                continue
            mb = parts[i]
            logps, _ = token_logprobs(policy, mb)
            if old[i] is None:
                old[i] = logps.detach()
            loss, m = grpo_loss(logps, old[i], adv[chunks[i].to(adv.device)], mb.completion_mask, ref[i],
                                beta=algo.beta, importance=algo.importance, clip_eps=algo.clip_eps,
                                truncate_max=algo.truncate_max, aggregation=algo.aggregation, n=n,
                                normalizer=normalizer)
            loss.backward()
            local += loss.item()
            micro.append({k: float(v) for k, v in m.items()})
        steps.append(step_fn() | {"loss": all_reduce_sum(local)})
    everyone = [m for part in gather_objects(micro) for m in part]
    return metrics | _mean_metrics(everyone + steps) | {"tokens/trained": float(kept.completion_mask.sum().item())}
