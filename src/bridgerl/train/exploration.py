"""OPTune in the loop (algorithms.md §2): regenerate only the batch's lowest-key prompts, merge the
new samples with each prompt's stored pair, and train wDPO on the pool's pairs."""
from __future__ import annotations

import torch

from ..algos.optune import PairPool, pair_weights, select_for_regeneration, select_random, selection_keys
from ..rollout.types import Rollouts, rollouts_from_tokens


def optune_rollouts(run, rows: list[dict], timer) -> tuple[Rollouts, torch.Tensor, dict, tuple, torch.Tensor]:
    """→ pair batch (rows 2g, 2g+1 = chosen, rejected of prompt g), rewards [G, 2], metrics,
    pairs (valid, chosen idx, rejected idx) and per-pair weights for the valid pairs."""
    cfg, ex = run.cfg, run.cfg.algo.exploration
    pool: PairPool = run.extras["optune"]
    n = cfg.rollout.n
    ids = [r["id"] for r in rows]
    known = [i for i in ids if i in pool]
    if ex.key == "random":
        picked = select_random(known, ex.rho, seed=cfg.train.seed * 1_000_003 + run.step)
    else:
        keys = selection_keys(pool, ex.key)
        picked = select_for_regeneration({i: keys[i] for i in known}, ex.rho)
    picked = set(picked)
    regen = [r for r in rows if r["id"] not in pool or r["id"] in picked]
    metrics = {"optune/prompts_regenerated": float(len(regen)), "tokens/generated": 0.0, "reward/failures": 0.0}
    if regen:
        with timer("generate"):
            new = run.generator.generate([run.encode_prompt(r) for r in regen], n, cfg.rollout, run.sample_rng)
        expanded = [r for r in regen for _ in range(n)]
        with timer("reward"):
            scores, reward_metrics = run.rewarder([r["prompt"] for r in expanded], new.completions, expanded)
        lengths = new.lengths.tolist()
        tokens = new.completion_ids.tolist()
        completions = [[tokens[g * n + j][:lengths[g * n + j]] for j in range(n)] for g in range(len(regen))]
        pool.merge_many([r["id"] for r in regen], completions, scores.view(len(regen), n), run.generator.version)
        mask = new.completion_mask.float()
        metrics |= reward_metrics | {
            "tokens/generated": float(mask.sum().item()),
            "completion_length": mask.sum(dim=1).mean().item(),
            "entropy": ((new.gen_entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
            "reward/fresh_mean": scores.float().mean().item(),
        }
    entries = [pool[i] for i in ids]
    prompts = [run.encode_prompt(r) for r in rows for _ in range(2)]
    completions = [side for e in entries for side in (e.chosen, e.rejected)]
    versions = [v for e in entries for v in (e.version_chosen, e.version_rejected)]
    batch = rollouts_from_tokens(prompts, completions, versions, run.tokenizer.pad_token_id, n=2).to(run.device)
    rewards = torch.tensor([[e.r_chosen, e.r_rejected] for e in entries], dtype=torch.float32)
    gaps = rewards[:, 0] - rewards[:, 1]
    valid = gaps > 0
    G = len(entries)
    pairs = (valid, torch.zeros(G, dtype=torch.long), torch.ones(G, dtype=torch.long))
    beta2 = ex.beta2 if ex.weighting != "none" else 0.0
    scheme = ex.weighting if ex.weighting != "none" else "softmax"
    weights = pair_weights(gaps[valid].double(), beta2, scheme, ex.normalize).float().to(run.device)
    if len(weights):
        metrics |= {"optune/mean_weight": weights.mean().item(), "optune/weight_max": weights.max().item(),
                    "optune/gap_mean": gaps[valid].mean().item()}
    return batch, rewards, metrics | pool.stats(run.generator.version), pairs, weights
