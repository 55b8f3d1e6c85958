"""Paired GRPO vs GRPO + variance increase (algorithms.md §3) on a graded verifiable reward.

One SFT seed model; for every training seed s and both settings of `algo.normalize_std`, two runs
differ only in `algo.grpovi` (same seed model, same `train.seed`, so the same prompt order, the same
first samples and the same eval sampling stream). The task is arithmetic with partial credit, so group
rewards are non-binary and the variance increase has something to change; the share of groups it
changed is logged. The measure is the area under the held-out reward curve (sampled evaluation: a
fixed set of held-out prompts, each asked several times at the eval temperature), divided by the
number of steps, i.e. the mean held-out reward over the run; and the final held-out reward.
Per pair, VI − GRPO: mean ± SE over pairs, how many pairs are positive, and the two-sided sign test.

    python bench/grpovi.py                                 # the full bench (10 seeds × 2 × 2 runs)
    python bench/grpovi.py --quick                         # smoke run (< 1 min)
    python bench/grpovi.py --seeds 3 --lr 1e-4 --results none   # an lr probe; writes no results
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARMS = ("grpo", "grpovi")


def seed_model(out: Path, task: str, sft_steps: int) -> Path:
    """The SFT seed every run starts from, built once and reused from `out/seed`."""
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


def eval_file(out: Path, task: str, prompts: int, samples: int) -> Path:
    """Held-out prompts fixed for every run (the builtin split would follow train.seed), each repeated
    `samples` times so the sampled evaluation averages several answers per prompt."""
    from bridgerl.data.tasks import builtin_rows

    rows = builtin_rows(task, prompts, seed=0, split="test")
    path = out / f"eval_{prompts}x{samples}.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "task")}) + "\n"
                            for r in rows for _ in range(samples)))
    return path


def run_arm(args, seed_dir: Path, evals: Path, arm: str, normalize_std: bool, seed: int) -> list[dict]:
    from bridgerl.config import load_config
    from bridgerl.train.loop import train

    overrides = [
        f"model.path={seed_dir}", "algo.name=grpo", f"algo.normalize_std={str(normalize_std).lower()}",
        "algo.grpovi={}" if arm == "grpovi" else "algo.grpovi=null", f"algo.beta={args.beta}",
        f"data.train=builtin:{args.task}", "data.num_train=2000", f"data.eval={evals}",
        f"data.prompts_per_step={args.prompts}", "rewards.tasks={arithmetic: {kind: partial}}",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"optim.lr={args.lr}", f"train.steps={args.steps}", f"train.seed={seed}",
        f"eval.every={args.eval_every}", f"eval.max_new_tokens={args.max_new_tokens}",
        f"eval.temperature={args.eval_temperature}", f"eval.max_prompts={args.eval_prompts * args.eval_samples}",
        "log.progress=false", "log.tensorboard=false", "train.save_final=false", "train.device=cpu"]
    run_dir = Path(args.out) / f"lr{args.lr:g}-std{int(normalize_std)}-{arm}-seed{seed}"
    done = run_dir / "bench_done.json"
    # A finished run with the same settings is reused, so an interrupted bench picks up where it stopped.
    if not (done.exists() and json.loads(done.read_text()) == overrides):
        train(load_config(None, overrides + [f"train.out_dir={run_dir}"]))
        done.write_text(json.dumps(overrides))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize_run(lines: list[dict], steps: int) -> dict:
    curve = sorted({m["step"]: m["eval/score"] for m in lines if "eval/score" in m}.items())
    if curve[0][0] != 0 or curve[-1][0] != steps:
        raise RuntimeError(f"held-out curve covers steps {curve[0][0]}..{curve[-1][0]}, not 0..{steps}: "
                           "delete the run's folder and rerun the bench")
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(curve, curve[1:])) / steps
    trained = [m for m in lines if "reward/mean" in m]
    changed = [m["reward/var_groups_changed"] for m in trained if "reward/var_groups_changed" in m]
    # No training-reward figure: with algo.grpovi the loop logs reward/mean of the shaped rewards.
    return {"curve": curve, "auc": area, "final": curve[-1][1], "start": curve[0][1],
            "groups_skipped": statistics.mean(m["groups/skipped"] for m in trained),
            "vi_changed_share": statistics.mean(changed) if changed else None,
            "var_before": statistics.mean(m["reward/var_before"] for m in trained) if changed else None,
            "var_after": statistics.mean(m["reward/var_after"] for m in trained) if changed else None,
            "step_time": statistics.median(m["time/step"] for m in trained)}


def sign_test(diffs: list[float]) -> float:
    """Two-sided exact binomial sign test; zero differences are dropped."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    k, n = min(pos, neg), pos + neg
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(diffs: list[float]) -> dict:
    from bridgerl.report.summary import across_seeds

    mean, se = across_seeds(diffs)
    return {"mean": mean, "se": se, "positive": sum(d > 0 for d in diffs),
            "pairs": len(diffs), "sign_p": sign_test(diffs), "diffs": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_grpovi", help="run folders and the cached seed model")
    ap.add_argument("--results", default="bench/results/grpovi", help="where results.json and results.md go; "
                                                                       "'none' writes nothing")
    ap.add_argument("--seeds", type=int, default=10, help="paired training seeds 0..seeds-1")
    ap.add_argument("--std", choices=("both", "on", "off"), default="both", help="algo.normalize_std settings")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (group size)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--task", default="arithmetic:easy")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.001)
    ap.add_argument("--eval-prompts", type=int, default=32, help="fixed held-out prompts")
    ap.add_argument("--eval-samples", type=int, default=4, help="sampled answers per held-out prompt")
    ap.add_argument("--eval-temperature", type=float, default=1.0)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 steps, small eval, no results")
    args = ap.parse_args()
    root = Path(args.out)  # the seed model lives here, shared by the quick and the full runs
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.prompts, args.eval_prompts = 1, 4, 2, 4, 8
        args.out, args.results = str(root / "quick"), "none"
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seed_dir = seed_model(root, args.task, args.sft_steps)
    evals = eval_file(out, args.task, args.eval_prompts, args.eval_samples)
    stds = {"both": (True, False), "on": (True,), "off": (False,)}[args.std]
    runs: dict[str, dict[str, list[dict]]] = {f"std={s}": {arm: [] for arm in ARMS} for s in stds}
    for seed in range(args.seeds):
        for std in stds:
            for arm in ARMS:  # the two arms of a pair run back to back, so machine load hits both alike
                lines = run_arm(args, seed_dir, evals, arm, std, seed)
                runs[f"std={std}"][arm].append(summarize_run(lines, args.steps))
    report(args, runs, time.perf_counter() - start)


def report(args, runs: dict, seconds: float) -> None:
    summary = {}
    table = ["| normalize_std | arm | AUC / steps (mean ± SE) | final (mean ± SE) | groups VI changed | "
             "p-weighted group var before → after VI |", "|---|---|---|---|---|---|"]
    pairs = ["| normalize_std | measure | VI − GRPO (mean ± SE) | pairs VI > GRPO | sign test p |",
             "|---|---|---|---|---|"]

    from bridgerl.report.summary import across_seeds

    def mse(xs):
        return "{:.4f} ± {:.4f}".format(*across_seeds(xs))

    for setting, arms in runs.items():
        for arm, rs in arms.items():
            vi = [r for r in rs if r["vi_changed_share"] is not None]
            shaping = (f"{statistics.mean(r['vi_changed_share'] for r in vi):.1%} | "
                       f"{statistics.mean(r['var_before'] for r in vi):.4f} → "
                       f"{statistics.mean(r['var_after'] for r in vi):.4f}") if vi else "— | —"
            table.append(f"| {setting[4:]} | {arm} | {mse([r['auc'] for r in rs])} | {mse([r['final'] for r in rs])} | "
                         f"{shaping} |")
        summary[setting] = {"runs": arms}
        for measure in ("auc", "final"):
            d = paired([b[measure] - a[measure] for a, b in zip(arms["grpo"], arms["grpovi"])])
            summary[setting][f"diff_{measure}"] = d
            pairs.append(f"| {setting[4:]} | {measure} | {d['mean']:+.4f} ± {d['se']:.4f} | "
                         f"{d['positive']}/{d['pairs']} | {d['sign_p']:.3f} |")
        starts = {round(a["start"], 6) == round(b["start"], 6) for a, b in zip(arms["grpo"], arms["grpovi"])}
        summary[setting]["pair_start_identical"] = starts == {True}
    seeds = len(next(iter(runs.values()))["grpo"])
    head = (f"{seeds} paired seeds × {args.steps} steps × {args.prompts} prompts × {args.n} samples, lr {args.lr:g}, "
            f"β {args.beta:g}, task {args.task} with partial credit; held-out: {args.eval_prompts} fixed prompts × "
            f"{args.eval_samples} samples at T={args.eval_temperature:g}, every {args.eval_every} steps; "
            f"{seconds / 60:.1f} min wall")
    text = "\n".join([head, "", *table, "", *pairs])
    print("\n" + text)
    for setting, s in summary.items():
        if not s["pair_start_identical"]:
            print(f"warning ({setting}): the two arms of a pair start from different held-out scores, "
                  "so they are not paired as intended")
    if args.results != "none":
        res = Path(args.results)
        res.mkdir(parents=True, exist_ok=True)
        (res / "results.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, **summary}, indent=1))
        (res / "results.md").write_text(f"Command: `python bench/grpovi.py {' '.join(os.sys.argv[1:])}`\n\n{text}\n")
        print(f"results: {res / 'results.json'}, {res / 'results.md'}")


if __name__ == "__main__":
    main()
