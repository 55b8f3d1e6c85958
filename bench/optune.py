"""OPTune vs online DPO (algorithms.md §2): generated tokens saved, and held-out score at an equal budget.

From the demo's tiny model and SFT seed (`bridgerl.demo.tiny_and_seed_stages`, built here or reused
from this folder's cache), on the demo's verifiable task (arithmetic checked by Math-Verify), each RL
seed trains every arm with the same prompts per step, samples per prompt, β, lr and optimizer, over a
prompt set small enough to be revisited every few steps (OPTune only saves generation on prompts it
has seen before):

  online DPO       every prompt of the batch sampled at every step
  OPTune ρ         a prompt without a stored pair is sampled; of the others only the ⌈ρ·|known|⌉ with
                   the lowest key (the stored chosen reward) are regenerated; pairs weighted by wDPO
  random ρ         the same pool and wDPO, the regenerated prompts drawn at random (the control)

Two budgets, both paired by seed against online DPO:

  equal steps      every arm stops at --steps; its generated tokens are counted
  equal tokens     the budget is what online DPO of the same seed generated in --steps; every other arm
                   keeps training while its cumulative generated tokens stay within it (at most
                   --max-steps-factor × --steps), and its policy at the last step within the budget is scored

Held-out score: each scored policy answers the same --eval-prompts held-out prompts with --eval-samples
replies at --eval-temperature, drawn from the same random stream (the demo's `evaluate_sampled`); a
prompt's score is its mean reward and the ± of one evaluation is over prompts. Table cells are mean ± SE
across the RL seeds; "Δ vs online DPO" is the mean ± SE of the per-seed difference.

    python bench/optune.py --quick              # smoke run (1 seed, 2 arms; ~1 min plus the quick seed model)
    python bench/optune.py                      # the docs/optune.md table: 3 seeds × 5 arms (ρ = 0.5, 0.75),
                                                # ~45 min wall on a 2-core CPU shared with 6-8 other jobs

Writes bench/results/optune/{report.md,results.json} (--results; the --quick run writes only under --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "optune"
DPO = "online DPO"


def arms(rhos: list[float], dpo_beta: float) -> dict[str, dict]:
    """Arm name → algo config. Same β everywhere; OPTune and random differ only in the selection key."""
    out = {DPO: {"name": "dpo", "beta": dpo_beta}}
    for rho in rhos:
        out[f"OPTune ρ={rho:g}"] = {"name": "dpo", "beta": dpo_beta, "optune": {"rho": rho}}
        out[f"random ρ={rho:g}"] = {"name": "dpo", "beta": dpo_beta, "optune": {"rho": rho, "key": "random"}}
    return out


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("ρ=", "rho").replace(".", "p").lower()


def run_config(P, st, model: Path, folder: Path, seed: int, algo: dict, args) -> dict:
    """The demo's verifiable-task config for one arm; held-out scoring is done afterwards, not in the loop."""
    return P.merge_dicts(P.base_config(st, model, folder, seed), {
        "algo": algo, "reference": {"sync": "with_generator"}, "rollout": {"sync_every": 1},
        "data": {"num_train": args.prompts, "num_eval": 1},
        "train": {"steps": args.steps * args.max_steps_factor, "save_final": False},
        "eval": {"every": 0, "at_start": False}, "log": {"progress": False, "tensorboard": False}})


def save_policy(run, folder: Path, state: dict | None = None) -> Path:
    if state is not None:
        run.policy.load_state_dict(state)
    run.policy.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    return folder


def train_to_budget(raw: dict, folder: Path, steps: int, budget: float | None, max_steps: int) -> dict:
    """Train one arm with the library's own step (`train_step`), logging to metrics.jsonl, until it has
    done `steps` steps and its next step would take its cumulative generated tokens past `budget`
    (budget None: stop at `steps`). Saves the policy at `steps` (at_steps/) and at the last step within
    the budget (at_tokens/)."""
    from bridgerl.demo.settings import config_from
    from bridgerl.train.logger import MetricsLogger
    from bridgerl.train.loop import train_step
    from bridgerl.train.run import build_run

    cfg = config_from(raw, folder / "bench_config.yaml")
    run = build_run(cfg)
    logger = MetricsLogger(run.out_dir, cfg.log)
    tokens = seconds = 0.0
    regen, pairs = [], []
    at_steps = within = None
    state = None  # the policy's weights at the last step within the budget
    try:
        while run.step < max_steps:
            m = train_step(run)
            logger.log(run.step, m)
            tokens += m["tokens/generated"]
            seconds += m["time/step"]
            regen.append(m.get("optune/prompts_regenerated", float(cfg.data.prompts_per_step)))
            pairs.append(m.get("dpo/pairs", 0.0))
            point = {"step": run.step, "tokens": tokens, "train_s": seconds}
            if run.step == steps:
                at_steps = point | {"model": str(save_policy(run, folder / "at_steps"))}
            if budget is not None and tokens <= budget:
                within = point
                state = {k: v.detach().clone() for k, v in run.policy.state_dict().items()}
            if run.step >= steps and (budget is None or tokens > budget):
                break
        if budget is None:
            within = at_steps
        else:
            if within is None:
                raise RuntimeError(f"the first step of {folder} already generated more than the budget "
                                   f"({budget:.0f} tokens); raise --steps so online DPO's budget is larger")
            within["model"] = str(save_policy(run, folder / "at_tokens", state))
        capped = budget is not None and tokens <= budget  # stopped by max_steps with budget left
    finally:
        run.generator.close()
        logger.close()
    return {"at_steps": at_steps, "at_tokens": within, "capped": capped,
            "prompts_regenerated_per_step": statistics.mean(regen[:steps]),
            "pairs_per_step": statistics.mean(pairs[:steps]), "steps_run": run.step}


def score(P, st, model: str, folder: Path, args) -> dict:
    """The held-out score of one saved policy: same prompts and random stream (eval seed fixed) for all."""
    from bridgerl.demo.evaluation import evaluate_sampled

    return evaluate_sampled(Path(model), f"builtin:{st.rl_task}", {"arithmetic": {"kind": "math"}},
                            args.eval_prompts, args.eval_samples, args.eval_temperature, 1.0, st.max_new_tokens,
                            args.eval_seed, folder)


def arm_stage(P, st, folder: Path, raw: dict, budget: float | None, args) -> dict:
    res = train_to_budget(raw, folder, args.steps, budget, args.steps * args.max_steps_factor)
    res["at_steps"]["score"] = score(P, st, res["at_steps"]["model"], folder / "eval_at_steps", args)
    if budget is None:
        res["at_tokens"] = res["at_steps"]
    else:
        res["at_tokens"]["score"] = score(P, st, res["at_tokens"]["model"], folder / "eval_at_tokens", args)
    return res


def pm(values: list[float], fmt: str = ".3f") -> str:
    """mean ± SE across seeds; a "+" in fmt signs the mean only."""
    from bridgerl.report.summary import across_seeds

    mean, se = across_seeds(values)
    return f"{mean:{fmt}} ± {se:{fmt.replace('+', '')}}"


def summarise(results: dict[str, list[dict]], seed_score: dict, args) -> tuple[list[str], dict]:
    """One markdown table (a row per arm, mean ± SE across seeds) and the numbers behind it."""
    from bridgerl.report.summary import across_seeds

    dpo = results[DPO]
    lines = ["| arm | gen. tokens in %d steps (k) | tokens saved vs online DPO | held-out at %d steps | Δ vs online DPO "
             "| steps within online DPO's tokens | held-out at equal tokens | Δ vs online DPO | prompts sampled per step "
             "| train s in %d steps (loaded CPU) |" % (args.steps, args.steps, args.steps),
             "|---|---|---|---|---|---|---|---|---|---|"]
    table = {}
    for name, runs in results.items():
        tok = [r["at_steps"]["tokens"] for r in runs]
        saved = [1 - r["at_steps"]["tokens"] / d["at_steps"]["tokens"] for r, d in zip(runs, dpo)]
        s_steps = [r["at_steps"]["score"]["mean"] for r in runs]
        s_tok = [r["at_tokens"]["score"]["mean"] for r in runs]
        d_steps = [a - d["at_steps"]["score"]["mean"] for a, d in zip(s_steps, dpo)]
        d_tok = [a - d["at_tokens"]["score"]["mean"] for a, d in zip(s_tok, dpo)]
        n_tok = [r["at_tokens"]["step"] for r in runs]
        row = {"generated_tokens": across_seeds(tok), "saved_share": across_seeds(saved),
               "heldout_at_steps": across_seeds(s_steps), "delta_at_steps": across_seeds(d_steps),
               "steps_at_tokens": n_tok, "heldout_at_tokens": across_seeds(s_tok),
               "delta_at_tokens": across_seeds(d_tok), "capped": [r["capped"] for r in runs],
               "per_seed": {"heldout_at_steps": s_steps, "heldout_at_tokens": s_tok, "generated_tokens": tok}}
        table[name] = row
        base = name == DPO
        lines.append("| " + " | ".join([
            name, pm([t / 1e3 for t in tok], ".0f"), "–" if base else pm([100 * s for s in saved], ".0f") + " %",
            pm(s_steps), "–" if base else pm(d_steps, "+.3f"),
            ", ".join(f"{n}{'*' if r['capped'] else ''}" for n, r in zip(n_tok, runs)),
            pm(s_tok), "–" if base else pm(d_tok, "+.3f"),
            f"{statistics.mean(r['prompts_regenerated_per_step'] for r in runs):.1f}",
            f"{statistics.median(r['at_steps']['train_s'] for r in runs):.0f}"]) + " |")
    ses = [r[k]["score"]["se"] for runs in results.values() for r in runs for k in ("at_steps", "at_tokens")]
    lines += ["", f"Seed model (SFT): held-out {seed_score['mean']:.3f} ± {seed_score['se']:.3f}. One evaluation's "
              f"own SE (over prompts): median {statistics.median(ses):.3f}, max {max(ses):.3f}. "
              "\\* = stopped at --max-steps-factor × steps with budget left."]
    return lines, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_optune", help="work folder (models and runs are cached here)")
    ap.add_argument("--seeds", type=int, default=3, help="RL seeds 0..N-1 (the models are the demo's seed-0 models)")
    ap.add_argument("--rhos", type=float, nargs="*", default=[0.5, 0.75],
                    help="none: online DPO alone (ρ = 0.25 lost held-out score on a seed-0 probe, docs/optune.md)")
    ap.add_argument("--steps", type=int, default=60, help="the equal-steps budget; online DPO's tokens in it "
                                                            "are the equal-tokens budget")
    ap.add_argument("--max-steps-factor", type=int, default=4, help="an arm stops at this × --steps at the latest")
    ap.add_argument("--prompts", type=int, default=256,
                    help="training prompts, revisited every prompts/prompts_per_step steps")
    ap.add_argument("--prompts-per-step", type=int, default=None, help="default: the demo's")
    ap.add_argument("--lr", type=float, default=None, help="default: the demo's")
    ap.add_argument("--eval-prompts", type=int, default=400)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--eval-temperature", type=float, default=0.6)
    ap.add_argument("--eval-seed", type=int, default=0, help="held-out prompts and sampling stream, same for every arm")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--results", default=str(RESULTS), help="where report.md and results.json go")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, online DPO and OPTune ρ=0.5, 6 steps")
    args = ap.parse_args()
    import torch
    from transformers.utils import logging

    from bridgerl.demo import pipeline as P
    from bridgerl.demo import tiny_and_seed_stages
    from bridgerl.demo.settings import FULL, QUICK
    from bridgerl.demo.stages import StageRunner

    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()
    st = QUICK if args.quick else FULL
    if args.quick:
        args.seeds, args.steps, args.prompts, args.eval_prompts, args.eval_samples = 1, 6, 32, 64, 2
    st = replace(st, **{k: v for k, v in (("lr", args.lr), ("prompts_per_step", args.prompts_per_step)) if v})
    names = arms(args.rhos, st.dpo_beta)
    if args.quick:
        names = {k: v for k, v in names.items() if k in (DPO, "OPTune ρ=0.5")}
    out = Path(args.out)
    runner = StageRunner(out, total=3 + args.seeds * len(names))
    start = time.perf_counter()
    _, seeded = tiny_and_seed_stages(runner, out, st, 0)
    model = Path(seeded.result["model"])
    eval_keys = {k: getattr(args, k) for k in ("eval_prompts", "eval_samples", "eval_temperature", "eval_seed")}
    seed_score = runner.run("seed model: held-out score", out / "seed_eval", eval_keys,
                            lambda f: score(P, st, str(model), f, args), deps=[seeded]).result
    results: dict[str, list[dict]] = {name: [] for name in names}
    for seed in range(args.seeds):
        budget = None
        for name, algo in names.items():  # online DPO first: its tokens are this seed's budget
            folder = out / "runs" / f"{slug(name)}-seed{seed}"
            raw = run_config(P, st, model, folder, seed, algo, args)
            inputs = {"raw": raw, "steps": args.steps, "budget": budget, "eval": eval_keys}
            res = runner.run(f"{name}, seed {seed}", folder, inputs,
                             lambda f, raw=raw, budget=budget: arm_stage(P, st, f, raw, budget, args), deps=[seeded])
            r = res.result
            runner.say(f"  {r['at_steps']['tokens'] / 1e3:.0f}k tokens in {args.steps} steps, held-out "
                       f"{r['at_steps']['score']['mean']:.3f}; within the budget: step {r['at_tokens']['step']}, "
                       f"held-out {r['at_tokens']['score']['mean']:.3f}")
            results[name].append(r)
            if name == DPO:
                budget = r["at_steps"]["tokens"]
    lines, table = summarise(results, seed_score, args)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    header = [f"# OPTune vs online DPO at an equal budget ({args.seeds} seeds)\n",
              f"`python bench/optune.py {' '.join(sys.argv[1:])}`, {date}, {torch.get_num_threads()} torch thread(s). "
              f"Demo seed model ({st.arch}/{st.size}) on {st.rl_task}; {st.prompts_per_step} prompts × {st.n} samples "
              f"per step at T = {st.rollout_temperature}, {args.prompts} training prompts, lr {st.lr} "
              f"({st.warmup_steps} warm-up steps), β {st.dpo_beta}. Held-out: {args.eval_prompts} prompts × "
              f"{args.eval_samples} samples at T = {args.eval_temperature}, eval seed {args.eval_seed}. "
              f"Equal tokens = online DPO's generated tokens in {args.steps} steps, per seed. Cells: mean ± SE "
              f"across seeds; Δ: mean ± SE of the per-seed difference.\n"]
    text = "\n".join(header + lines + ["", f"{time.perf_counter() - start:.0f} s in this invocation."])
    print("\n" + text)
    dest = out if args.quick else Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "report.md").write_text(text + "\n")
    (dest / "results.json").write_text(json.dumps(
        {"args": vars(args), "settings": st.to_dict(), "seed_model": seed_score, "table": table,
         "runs": results}, indent=2, default=str))
    print(f"\nreport: {dest / 'report.md'}; data: {dest / 'results.json'}")


if __name__ == "__main__":
    main()
