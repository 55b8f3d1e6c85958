"""Held-out evaluation of a saved model with several samples per prompt.

The training loop's own evaluation draws one reply per prompt. On the demo's toy task that is
noisy: greedy accuracy flips on near-ties, and one sample at a time is a coin toss per prompt.
Here each prompt gets `samples` replies at the given temperature; its score is their mean, and the
standard error is taken over prompts (the samples of one prompt are not independent of each other),
so it says how far the number would move on another draw of held-out prompts.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["evaluate_sampled", "mean_se"]


def mean_se(values: list[float]) -> dict:
    """Mean and standard error of the mean (sample standard deviation / √n); se 0 for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "se": 0.0}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "se": math.sqrt(var / n)}


def evaluate_sampled(model: Path, data: str, rewards: dict, num: int, samples: int, temperature: float,
                     top_p: float, max_new_tokens: int, seed: int, scratch: Path) -> dict:
    """Score `samples` replies per held-out prompt of `data` (a builtin task or jsonl) from `model`.

    Returns {"mean", "se", "prompts", "samples", "temperature"}; temperature 0 means one greedy reply.
    """
    from ..rollout.hf import HFGenerator
    from ..train.run import build_run
    from .settings import config_from

    raw = {"model": {"path": str(model)}, "rewards": {"tasks": rewards},
           "data": {"train": data, "num_train": 1, "num_eval": num},
           "eval": {"max_prompts": num, "max_new_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": top_p},
           "train": {"seed": seed, "out_dir": str(scratch)}, "log": {"tensorboard": False, "progress": False}}
    if not data.startswith("builtin:"):
        raw["data"]["eval"] = data
    run = build_run(config_from(raw, scratch / "eval_config.yaml"))
    rows = run.eval_rows[:num]
    if not rows:
        raise ValueError(f"{data} has no held-out prompts to evaluate")
    k = 1 if temperature == 0 else samples
    gen = HFGenerator(run.policy, run.tokenizer, share_weights=True)
    # its own RNG, fixed by the seed: two models are compared on the same random stream
    rng = torch.Generator(device=run.device).manual_seed(seed + 11)
    out = gen.generate([run.prompts(r) for r in rows], k, run.cfg.eval, rng)
    expanded = [r for r in rows for _ in range(k)]
    scores, _ = run.rewarder([r["prompt"] for r in expanded], out.completions, expanded)
    per_prompt = scores.float().view(len(rows), k).mean(dim=1).tolist()
    return mean_se(per_prompt) | {"prompts": len(rows), "samples": k, "temperature": temperature}
