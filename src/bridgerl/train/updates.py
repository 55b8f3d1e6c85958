"""One policy update for each objective: micro-batching and gradient accumulation around the pure
losses of algos/. Each returns its metrics; the optimizer step is the caller's `step_fn`."""
from __future__ import annotations

from typing import Callable

import torch

from ..algos.dpo import build_pairs, dpo_loss, group_dpo_loss
from ..algos.grpo import grpo_loss, group_advantages
from ..rollout.types import Rollouts
from .logprobs import micro_batches, token_logprobs


def _mean_metrics(items: list[dict]) -> dict[str, float]:
    keys = {k for m in items for k in m}
    return {k: sum(m[k] for m in items if k in m) / sum(1 for m in items if k in m) for k in keys}


def grpo_update(policy, reference, batch: Rollouts, rewards: torch.Tensor, algo, micro_batch: int,
                policy_version: int, step_fn: Callable[[], dict]) -> dict:
    """rewards [G, n] (already shaped). Zero-variance groups carry no gradient and are dropped."""
    G, n = rewards.shape
    advantages = group_advantages(rewards, algo.normalize_std)
    keep = rewards.max(dim=1).values > rewards.min(dim=1).values
    metrics = {"groups/skipped": float(G - keep.sum().item()),
               "tokens/skipped": float(batch.completion_mask.view(G, n, -1)[~keep].sum().item())}
    rows = keep.repeat_interleave(n).nonzero().squeeze(1)
    if rows.numel() == 0:
        return metrics | {"loss": 0.0, "tokens/trained": 0.0, "update/skipped": 1.0}
    kept = batch.select(rows)
    adv = advantages.reshape(-1)[rows.to(advantages.device)]
    # kept groups stay contiguous (n rows each): chunks keep a prompt's rows together
    chunks = micro_batches(len(rows), kept.lengths, micro_batch, groups=torch.arange(len(rows)) // n)
    parts = [kept.select(c) for c in chunks]
    ref = [None] * len(parts)
    if algo.beta > 0:
        with torch.no_grad():
            ref = [token_logprobs(reference, mb)[0] for mb in parts]
    normalizer = {"sum": float(n), "token_mean": float(kept.completion_mask.sum().item()),
                  "seq_mean": float(len(rows))}[algo.aggregation]
    # On-policy (the generator holds this very policy) the ratio is exactly 1: old = current,
    # detached, with no extra forward. Stale samples are corrected against the generator's own log-probs.
    fresh = bool((kept.versions == policy_version).all())
    old: list[torch.Tensor | None] = [None if fresh else mb.gen_logprobs for mb in parts]
    collected = []
    for _ in range(algo.updates_per_batch):
        losses = 0.0
        for i, mb in enumerate(parts):
            logps, _ = token_logprobs(policy, mb)
            if old[i] is None:
                old[i] = logps.detach()
            loss, m = grpo_loss(logps, old[i], adv[chunks[i].to(adv.device)], mb.completion_mask, ref[i],
                                beta=algo.beta, importance=algo.importance, clip_eps=algo.clip_eps,
                                truncate_max=algo.truncate_max, aggregation=algo.aggregation, n=n,
                                normalizer=normalizer)
            loss.backward()
            losses += loss.item()
            collected.append(m)
        collected.append(step_fn() | {"loss": losses})
    return metrics | _mean_metrics(collected) | {"tokens/trained": float(kept.completion_mask.sum().item())}


def dpo_update(policy, reference, batch: Rollouts, rewards: torch.Tensor, binary: torch.Tensor, algo,
               micro_batch: int, step_fn: Callable[[], dict], rng: torch.Generator | None = None,
               pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               weights: torch.Tensor | None = None) -> dict:
    """One DPO update. `pairs` (valid, chosen, rejected) may be given (OPTune); otherwise built per
    group: random correct-vs-incorrect where `binary`, best-vs-worst elsewhere."""
    G, n = rewards.shape
    if algo.group:
        return _group_dpo_update(policy, reference, batch, rewards, algo, micro_batch, step_fn)
    if pairs is None:
        if algo.pairs != "auto":
            binary = torch.full_like(binary, algo.pairs == "random")
        pairs = build_pairs(rewards.cpu(), binary.cpu(), rng)
    valid, chosen, rejected = pairs
    groups = valid.nonzero().squeeze(1)
    metrics = {"groups/skipped": float(G - len(groups))}
    if len(groups) == 0:
        # No pair: loss 0, zero gradient, and no optimizer step (AdamW would still decay weights).
        return metrics | {"loss": 0.0, "tokens/trained": 0.0, "update/skipped": 1.0}
    chosen_rows, rejected_rows = groups * n + chosen[groups], groups * n + rejected[groups]
    P = len(groups)
    need_entropy = algo.entropy_coef > 0
    collected, total, trained = [], 0.0, 0.0
    for chunk in torch.arange(P).split(max(1, micro_batch // 2)):
        k = len(chunk)
        mb = batch.select(torch.cat([chosen_rows[chunk], rejected_rows[chunk]]))
        lengths = mb.completion_mask.sum(dim=1).clamp(min=1)
        with torch.no_grad():
            ref_seq = _sequence(token_logprobs(reference, mb)[0], lengths, algo.length_normalize)
        logps, entropy = token_logprobs(policy, mb, with_entropy=need_entropy)
        seq = _sequence(logps, lengths, algo.length_normalize)
        w = weights[chunk] if weights is not None else None
        loss, m = dpo_loss(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], algo.beta, weights=w, reduction="sum")
        if algo.reduction == "mean":
            loss = loss / P
        if algo.nll_coef:
            loss = loss + algo.nll_coef * (-(logps[:k].sum(dim=1) / lengths[:k])).sum() / P
        if need_entropy:
            loss = loss - algo.entropy_coef * (entropy[:k].sum(dim=1) / lengths[:k]).sum() / P
        loss.backward()
        total += loss.item()
        trained += float(mb.completion_mask.sum().item())
        collected.append(m)
    metrics |= _mean_metrics(collected) | {"dpo/pairs": float(P)}
    return metrics | step_fn() | {"loss": total, "tokens/trained": trained}


def _sequence(logps: torch.Tensor, lengths: torch.Tensor, normalize: bool) -> torch.Tensor:
    summed = logps.sum(dim=1)
    return summed / lengths if normalize else summed


def _group_dpo_update(policy, reference, batch, rewards, algo, micro_batch, step_fn) -> dict:
    G, n = rewards.shape
    keep = (rewards.max(dim=1).values > rewards.min(dim=1).values).nonzero().squeeze(1)
    metrics = {"groups/skipped": float(G - len(keep))}
    if len(keep) == 0:
        return metrics | {"loss": 0.0, "tokens/trained": 0.0, "update/skipped": 1.0}
    collected, total, trained = [], 0.0, 0.0
    for chunk in keep.split(max(1, micro_batch // n)):
        rows = (chunk[:, None] * n + torch.arange(n)).reshape(-1)
        mb = batch.select(rows)
        lengths = mb.completion_mask.sum(dim=1).clamp(min=1)
        with torch.no_grad():
            ref_seq = _sequence(token_logprobs(reference, mb)[0], lengths, algo.length_normalize).view(-1, n)
        seq = _sequence(token_logprobs(policy, mb)[0], lengths, algo.length_normalize).view(-1, n)
        loss, m = group_dpo_loss(seq, ref_seq, rewards[chunk].to(seq.device), algo.beta)
        loss = loss / len(keep)
        loss.backward()
        total += loss.item()
        trained += float(mb.completion_mask.sum().item())
        collected.append(m)
    return metrics | _mean_metrics(collected) | step_fn() | {"loss": total, "tokens/trained": trained}
