"""Held-out evaluation: one sample per prompt with the eval sampling settings, scored by the
task's own reward (accuracy for verifiable tasks, mean reward-model score otherwise)."""
from __future__ import annotations

import math

import torch

from ..rollout.hf import HFGenerator


def evaluate(run, rows: list[dict] | None = None) -> dict[str, float]:
    cfg = run.cfg.eval
    rows = (rows if rows is not None else run.eval_rows)[: cfg.max_prompts]
    if not rows:
        return {}
    if run.eval_generator is None:
        run.eval_generator = HFGenerator(run.policy, run.tokenizer, batch_size=run.cfg.rollout.batch_size,
                                         share_weights=True, fast_decode=run.cfg.rollout.fast_decode)
    gen = run.eval_generator
    # Eval sampling has its own RNG so that evaluating never shifts the training samples.
    rng = torch.Generator(device=run.device).manual_seed(run.cfg.train.seed + 7)
    out = gen.generate([run.prompts(r) for r in rows], 1, cfg, rng)
    scores, _ = run.rewarder([r["prompt"] for r in rows], out.completions, rows)
    return score_summary(scores, [r["task"] for r in rows]) | {
        "eval/completion_length": out.completion_mask.sum(dim=1).float().mean().item()}


def score_summary(scores: torch.Tensor, tasks: list[str], prefix: str = "eval") -> dict[str, float]:
    """Mean and standard error, overall and per task."""
    def stats(x: torch.Tensor) -> tuple[float, float]:
        se = x.std().item() / math.sqrt(len(x)) if len(x) > 1 else 0.0
        return x.mean().item(), se

    m: dict[str, float] = {}
    m[f"{prefix}/score"], m[f"{prefix}/score_se"] = stats(scores.float())
    for t in sorted(set(tasks)):
        sel = torch.tensor([x == t for x in tasks])
        m[f"{prefix}/{t}/score"], m[f"{prefix}/{t}/score_se"] = stats(scores[sel].float())
    return m
