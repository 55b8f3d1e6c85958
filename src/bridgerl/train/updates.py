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


def spread_rows(rewards: torch.Tensor) -> torch.Tensor:
    """Rows of the groups whose rewards differ ([G, n] → row indices): the only ones that train."""
    keep = rewards.max(dim=1).values > rewards.min(dim=1).values
    return keep.repeat_interleave(rewards.shape[1]).nonzero().squeeze(1)


def grpo_chunks(rows: torch.Tensor, lengths: torch.Tensor, micro_batch: int, n: int) -> list[torch.Tensor]:
    """Micro-batches (positions into `rows`) that keep each group's n contiguous rows together."""
    return micro_batches(len(rows), lengths, micro_batch, groups=torch.arange(len(rows)) // n)


def reference_logprobs(reference, batch: Rollouts, rows: torch.Tensor, micro_batch: int, n: int) -> torch.Tensor:
    """The reference's per-token log-probs [B, T] for `rows` of the batch (zero elsewhere), computed
    once per batch without grad; GRPOVI's p and GRPO's KL term both read them."""
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.completion_ids.device)
    if rows.numel() == 0:
        return out
    sub = batch.select(rows)
    with torch.no_grad():
        for chunk in grpo_chunks(rows, sub.lengths, micro_batch, n):
            logps = token_logprobs(reference, sub.select(chunk))[0]
            out[rows[chunk.to(rows.device)], :logps.shape[1]] = logps.float()
    return out


def grpo_update(policy, reference, batch: Rollouts, rewards: torch.Tensor, algo, micro_batch: int,
                policy_version: int, step_fn: Callable[[], dict], ref_logps: torch.Tensor | None = None) -> dict:
    """rewards [G, n] (already shaped). Zero-variance groups carry no gradient and are dropped.
    `ref_logps` [B, T]: the reference's token log-probs of the trained rows, if already at hand."""
    G, n = rewards.shape
    advantages = group_advantages(rewards, algo.normalize_std)
    keep = rewards.max(dim=1).values > rewards.min(dim=1).values
    metrics = {"groups/skipped": float(G - keep.sum().item()),
               "tokens/skipped": float(batch.completion_mask.view(G, n, -1)[~keep].sum().item())}
    rows = spread_rows(rewards)
    if rows.numel() == 0:
        return metrics | {"loss": 0.0, "tokens/trained": 0.0, "update/skipped": 1.0}
    kept = batch.select(rows)
    adv = advantages.reshape(-1)[rows.to(advantages.device)]
    chunks = grpo_chunks(rows, kept.lengths, micro_batch, n)
    parts = [kept.select(c) for c in chunks]
    ref = [None] * len(parts)
    if algo.beta > 0:
        if ref_logps is None:
            ref_logps = reference_logprobs(reference, batch, rows, micro_batch, n)
        ref = [ref_logps[rows[c.to(rows.device)], :mb.completion_ids.shape[1]] for c, mb in zip(chunks, parts)]
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
               weights: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None) -> dict:
    """One DPO update. `pairs` (valid, chosen, rejected) may be given (OPTune); otherwise built per
    group: random correct-vs-incorrect where `binary`, best-vs-worst elsewhere. `ref_logps` [B, T]:
    the reference's token log-probs of the batch, if already at hand."""
    G, n = rewards.shape
    if algo.group:
        return _group_dpo_update(policy, reference, batch, rewards, algo, micro_batch, step_fn, ref_logps)
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
        rows = torch.cat([chosen_rows[chunk], rejected_rows[chunk]])
        mb = batch.select(rows)
        lengths = mb.completion_mask.sum(dim=1).clamp(min=1)
        ref_seq = _sequence(_reference(reference, mb, rows, ref_logps), lengths, algo.length_normalize)
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


def _reference(reference, mb: Rollouts, rows: torch.Tensor, ref_logps: torch.Tensor | None) -> torch.Tensor:
    """The reference's token log-probs of micro-batch `mb` (= batch rows `rows`): given, or computed."""
    if ref_logps is not None:
        return ref_logps[rows.to(ref_logps.device), :mb.completion_ids.shape[1]]
    with torch.no_grad():
        return token_logprobs(reference, mb)[0]


def _group_dpo_update(policy, reference, batch, rewards, algo, micro_batch, step_fn, ref_logps=None) -> dict:
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
        ref_seq = _sequence(_reference(reference, mb, rows, ref_logps), lengths, algo.length_normalize).view(-1, n)
        seq = _sequence(token_logprobs(policy, mb)[0], lengths, algo.length_normalize).view(-1, n)
        loss, m = group_dpo_loss(seq, ref_seq, rewards[chunk].to(seq.device), algo.beta)
        loss = loss / len(keep)
        loss.backward()
        total += loss.item()
        trained += float(mb.completion_mask.sum().item())
        collected.append(m)
    return metrics | _mean_metrics(collected) | step_fn() | {"loss": total, "tokens/trained": trained}
