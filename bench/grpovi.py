"""Sample efficiency of GRPO vs GRPOVI (algorithms.md §3) on a graded verifiable reward.

From one SFT seed, both arms train with identical settings on arithmetic with partial credit
(non-binary, so variance increase has something to do); held-out mean reward is tracked against
step, and each arm reports the steps it needs to reach a fixed held-out reward, over several seeds.

    python bench/grpovi.py --seeds 3 --steps 40          # ~10 min on 2 CPU cores
    python bench/grpovi.py --quick                         # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def seed_model(out: Path, task: str, sft_steps: int) -> Path:
    from bridgerl.config import SFTConfig
    from bridgerl.models import make_tiny_model
    from bridgerl.supervised.sft import sft

    seed_dir = out / "seed"
    if (seed_dir / "config.json").exists():
        return seed_dir
    base = make_tiny_model(out / "base", "llama", "micro", seed=0)
    cfg = SFTConfig(model={"path": str(base)}, data={"train": f"builtin:{task}", "num_train": 2000},
                    steps=sft_steps, batch_size=32, optim={"lr": 3e-3, "schedule": "cosine", "warmup_steps": 10},
                    out_dir=str(seed_dir), device="cpu")
    return sft(cfg, progress=False)


def run_arm(seed_dir: Path, out: Path, task: str, shaping: str, seed: int, steps: int, eval_every: int,
            prompts: int, n: int, lr: float, eval_temperature: float) -> list[dict]:
    from bridgerl.config import load_config
    from bridgerl.train.loop import train

    run_dir = out / f"{shaping}-seed{seed}"
    cfg = load_config(None, [
        f"model.path={seed_dir}", "algo.name=grpo", "algo.grpovi={}" if shaping == "variance_increase" else "algo.grpovi=null", "algo.beta=0.001",
        f"data.train=builtin:{task}", "data.num_train=2000", "data.num_eval=128", f"data.prompts_per_step={prompts}",
        "rewards.tasks={arithmetic: {kind: partial}}", f"rollout.n={n}", "rollout.max_new_tokens=40",
        f"optim.lr={lr}", f"train.steps={steps}", f"train.seed={seed}", f"train.out_dir={run_dir}",
        f"eval.every={eval_every}", "eval.max_new_tokens=40", f"eval.temperature={eval_temperature}", "eval.max_prompts=128", "log.progress=false",
        "log.tensorboard=false", "train.save_final=false", "train.device=cpu"])
    train(cfg)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    return next((step for step, score in curve if score >= threshold), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_grpovi")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--task", default="arithmetic:easy")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--eval-temperature", type=float, default=1.0,
                    help="held-out reward of the sampling policy RL optimises (0 = greedy)")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--gain", type=float, default=0.05, help="threshold = seed held-out reward + gain")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.sft_steps, args.prompts = 1, 6, 3, 30, 4
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(1)  # two arms share two cores with whatever else runs; one thread each is steadier
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seed_dir = seed_model(out, args.task, args.sft_steps)
    results: dict[str, list] = {"none": [], "variance_increase": []}
    for seed in range(args.seeds):
        for shaping in results:  # arms alternate so machine load hits both alike
            lines = run_arm(seed_dir, out, args.task, shaping, seed, args.steps, args.eval_every, args.prompts, args.n,
                            args.lr, args.eval_temperature)
            curve = [(m["step"], m["eval/score"]) for m in lines if "eval/score" in m]
            steps = [m for m in lines if "reward/mean" in m]
            shaping_share = [m.get("time/grpovi", 0.0) / m["time/step"] for m in steps if m.get("time/step")]
            var = [(m.get("reward/var_before"), m.get("reward/var_after")) for m in steps if "reward/var_before" in m]
            results[shaping].append({"seed": seed, "curve": curve, "shaping_share": statistics.median(shaping_share),
                                     "var": var, "step_time": statistics.median(m["time/step"] for m in steps)})
    start_score = statistics.mean(r["curve"][0][1] for arm in results.values() for r in arm)
    threshold = start_score + args.gain
    print(f"\nseed held-out partial-credit reward {start_score:.3f}; threshold {threshold:.3f}; "
          f"{args.seeds} seeds × {args.steps} steps; {time.perf_counter() - start:.0f} s total\n")
    print("| arm | final held-out reward (mean ± sd over seeds) | steps to threshold (per seed) | shaping share of step |")
    print("|---|---|---|---|")
    summary = {}
    for shaping, runs in results.items():
        finals = [r["curve"][-1][1] for r in runs]
        reach = [steps_to(r["curve"], threshold) for r in runs]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        share = statistics.median(r["shaping_share"] for r in runs)
        name = "GRPO" if shaping == "none" else "GRPOVI"
        print(f"| {name} | {statistics.mean(finals):.3f} ± {sd:.3f} | {reach} | {share:.2%} |")
        summary[name] = {"final": finals, "steps_to_threshold": reach, "shaping_share": share,
                         "curves": [r["curve"] for r in runs], "step_time": [r["step_time"] for r in runs]}
    vi = [v for r in results["variance_increase"] for v in r["var"]]
    if vi:
        before = statistics.mean(v[0] for v in vi)
        after = statistics.mean(v[1] for v in vi)
        print(f"\nGRPOVI mean p-weighted group reward variance: {before:.4f} → {after:.4f}")
    (out / "results.json").write_text(json.dumps({"threshold": threshold, "arms": summary}, indent=2))
    plot(summary, out / "grpovi.png")
    print(f"results: {out / 'results.json'}, plot: {out / 'grpovi.png'}")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, arm), color in zip(summary.items(), ("tab:blue", "tab:orange")):
        for i, curve in enumerate(arm["curves"]):
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color=color, alpha=0.7,
                    label=name if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out partial-credit reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
