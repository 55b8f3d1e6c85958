"""OPTune's step in the loop (algorithms.md §2): regenerate only the lowest-ranked stored prompts,
merge the new samples into the pool, and train on the pool's pairs."""
from __future__ import annotations

import torch

from ..algos.optune import regeneration_stats, select_prompts
from ..rollout.types import Rollouts, rollouts_from_tokens, sample_and_score
from .run import Run


def sampler_metrics(rollouts: Rollouts, with_entropy: bool = True) -> dict[str, float]:
    """Generated tokens, mean completion length and (when the engine reports it; vLLM does not) the
    sampler's mean token entropy."""
    mask = rollouts.completion_mask.float()
    m = {"tokens/generated": float(mask.sum().item()), "completion_length": mask.sum(dim=1).mean().item()}
    if with_entropy:
        m["entropy"] = ((rollouts.gen_entropy * mask).sum() / mask.sum().clamp(min=1)).item()
    return m


def optune_batch(run: Run, rows: list[dict], timer) -> tuple[Rollouts, torch.Tensor, dict[str, float]]:
    """OPTune (algorithms.md §2): regenerate the batch's new prompts and the ⌈ρ·|known|⌉ lowest-key stored
    ones, merge each with its stored pair, and return the pool's pairs as groups of 2 (chosen, rejected)
    with rewards [G, 2]; a pair without a gap trains nothing."""
    opt, n, pool = run.cfg.algo.optune, run.cfg.rollout.n, run.optune_pool
    ids = [r["id"] for r in rows]
    picked = set(select_prompts(pool, opt.rho, opt.key, seed=run.cfg.train.seed * 1_000_003 + run.step, among=ids))
    regen = [r for r in rows if r["id"] not in pool or r["id"] in picked]
    metrics = {"optune/prompts_regenerated": float(len(regen)), "tokens/generated": 0.0, "reward/failures": 0.0}
    if regen:
        new, scores, reward_metrics = sample_and_score(run.generator, run.rewarder, run.prompts, regen, n,
                                                       run.cfg.rollout, run.sample_rng, timer)
        lengths, tokens = new.lengths.tolist(), new.completion_ids.tolist()
        completions = [[tokens[g * n + j][:lengths[g * n + j]] for j in range(n)] for g in range(len(regen))]
        merged = pool.merge_many([r["id"] for r in regen], completions, scores.view(len(regen), n),
                                 run.generator.version)
        sampled = sampler_metrics(new, getattr(run.generator, "reports_entropy", True))
        metrics |= reward_metrics | sampled | {"reward/fresh_mean": scores.float().mean().item()} | regeneration_stats(
            len(rows), len(regen), n, int(sampled["tokens/generated"]), merged, run.generator.version)
    entries = [pool[i] for i in ids]
    prompts = [run.prompts(r) for r in rows for _ in range(2)]
    completions = [side for e in entries for side in (e.chosen, e.rejected)]
    versions = [v for e in entries for v in (e.version_chosen, e.version_rejected)]
    pairs = rollouts_from_tokens(prompts, completions, versions, run.tokenizer.pad_token_id, n=2).to(run.device)
    rewards = torch.tensor([[e.r_chosen, e.r_rejected] for e in entries], dtype=torch.float32)
    return pairs, rewards, metrics | pool.stats(run.generator.version)
