"""GRPO loss variants side by side on the demo's verifiable task (algo.loss: grpo | dr_grpo | dapo
| gspo | cispo), from the demo's own SFT seed, several seeds each.

Each run is `bridgerl train` with the demo's GRPO config changed only by the levers the demo
calibration found to move sampled reward on this task (lr 1e-4, adam_eps 1e-8,
grad_clip 1.0), two updates per batch (so the ratio leaves 1 and the variants' clipping acts), and
`algo.loss`. The score is the sampled (T = 1) held-out accuracy, the
quantity RL optimises, on the demo's held-out prompts; tokens are the ledger's generated and
trained counts.

    python bench/variants.py                     # 5 variants × 3 seeds × 30 steps
    python bench/variants.py --quick             # smoke run: 2 variants, 1 seed, 4 steps
    python bench/variants.py --updates 1         # purely on-policy: the ratio is 1, only scaling differs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("grpo", "dr_grpo", "dapo", "gspo", "cispo")


def seed_model(out: Path) -> Path:
    """The demo's tiny model and SFT seed (stages 1–2), built once and reused by every run."""
    from bridgerl.demo.pipeline import stage_seed, stage_tiny
    from bridgerl.demo.settings import FULL

    model = out / "seed" / "model"
    if (model / "config.json").exists():
        return model
    (out / "seed").mkdir(parents=True, exist_ok=True)
    stage_tiny(out / "tiny", FULL, 0)
    result = stage_seed(out / "seed", FULL, out / "tiny", 0)
    print(f"seed: greedy held-out accuracy {result['accuracy']['mean']:.3f}", flush=True)
    return Path(result["model"])


def run_variant(model: Path, out: Path, loss: str, seed: int, args) -> dict:
    from bridgerl.demo.pipeline import base_config, config_from, merge_dicts
    from bridgerl.demo.settings import FULL
    from bridgerl.train.loop import train

    run_dir = out / f"{loss}-seed{seed}"
    raw = merge_dicts(base_config(FULL, model, run_dir, seed), {
        "algo": {"name": "grpo", "beta": FULL.grpo_beta, "loss": loss, "updates_per_batch": args.updates},
        "data": {"prompts_per_step": args.prompts, "num_eval": args.num_eval},
        "optim": {"lr": args.lr, "adam_eps": 1e-8, "grad_clip": 1.0},
        "train": {"steps": args.steps, "save_final": False},
        "eval": {"every": args.eval_every, "max_prompts": args.num_eval, "temperature": 1.0},
        "log": {"progress": False},
    })
    cfg = config_from(raw, run_dir / "variant_config.yaml")
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(m["step"], m["eval/score"]) for m in lines if "eval/score" in m]
    steps = [m for m in lines if "reward/mean" in m]
    return {"seed": seed, "curve": evals, "wall_s": wall,
            "gen_tokens": sum(m.get("tokens/generated", 0.0) for m in steps),
            "trained_tokens": sum(m.get("tokens/trained", 0.0) for m in steps),
            "train_reward_last10": statistics.mean(m["reward/mean"] for m in steps[-10:]),
            "clipped_frac": statistics.mean(m.get("ratio/clipped_frac", 0.0) for m in steps)}


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_variants")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--updates", type=int, default=2,
                    help="algo.updates_per_batch; the second update is off-policy, where the variants' ratio "
                         "treatments differ (at ratio 1 dapo and cispo give the same gradient)")
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--num-eval", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.variants, args.seeds, args.steps, args.eval_every, args.num_eval, args.prompts = "grpo,gspo", 1, 4, 2, 32, 8
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(1)  # shared 2-core machine: one thread per process is the steadier measure
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = seed_model(out)
    variants = args.variants.split(",")
    results: dict[str, list] = {v: [] for v in variants}
    for seed in range(args.seeds):
        for loss in variants:  # variants alternate within a seed so machine load hits all alike
            r = run_variant(model, out, loss, seed, args)
            results[loss].append(r)
            print(f"{loss} seed {seed}: held-out {r['curve'][0][1]:.3f} → {r['curve'][-1][1]:.3f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
    start_score = statistics.mean(r["curve"][0][1] for runs in results.values() for r in runs)
    print(f"\n{args.seeds} seeds × {args.steps} steps × {args.prompts} prompts × 8 samples, lr {args.lr}, "
          f"updates_per_batch {args.updates}; step-0 sampled held-out {start_score:.3f}; "
          f"{time.perf_counter() - start:.0f} s total\n")
    print("| loss | held-out (final, mean ± sd over seeds) | held-out (last 2 evals) | train reward (last 10) "
          "| clipped share | gen tokens | trained tokens | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for loss, runs in results.items():
        finals = [r["curve"][-1][1] for r in runs]
        last2 = [statistics.mean(s for _, s in r["curve"][-2:]) for r in runs]
        print(f"| {loss} | {mean_sd(finals)} | {mean_sd(last2)} | {mean_sd([r['train_reward_last10'] for r in runs])} "
              f"| {statistics.mean(r['clipped_frac'] for r in runs):.3f} "
              f"| {statistics.mean(r['gen_tokens'] for r in runs) / 1e3:.1f}k "
              f"| {statistics.mean(r['trained_tokens'] for r in runs) / 1e3:.1f}k "
              f"| {statistics.mean(r['wall_s'] for r in runs):.0f} |")
        summary[loss] = runs
    (out / "results.json").write_text(json.dumps({"args": vars(args), "start": start_score, "runs": summary}, indent=2))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
