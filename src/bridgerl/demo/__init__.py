"""`bridgerl demo`: offline vs semi-online vs online training from one seed, end to end, with a report.

    from bridgerl.demo import run_demo
    report = run_demo("runs/demo", quick=False, seed=0)

Stages (each cached in its own folder under `out`, so a second run skips what is finished):
tiny model → seed (SFT) → offline / semi-online ×2 / online DPO, GRPO, OPTune → reward model →
online DPO, GRPO, GRPO + VI against the reward model → multi-task online DPO → cross-task
evaluation → report.md + plots. `settings.py` holds the sizes of the full and quick versions.
"""
from __future__ import annotations

import os
import time
import warnings
from functools import partial
from pathlib import Path

from .settings import FULL, QUICK, DemoSettings, settings_for
from .stages import Stage, StageResult, StageRunner

__all__ = ["run_demo", "pick_jobs", "DemoSettings", "FULL", "QUICK", "settings_for"]


def pick_jobs(requested: int | None = None) -> int:
    """Training runs at once: `requested`, else one per core (at most 8) unless the machine is already
    busy, then 1. Tiny models make many small ops; when other processes hold the cores, a second
    process or thread mostly waits for a core (we measured steps several times slower with 2 threads
    than with 1 on a loaded 2-core machine)."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > max(0.5, cores - 1.0):
        return 1
    return min(cores, 8)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0,
             settings: DemoSettings | None = None, log=None, threads: int = 1,
             jobs: int | None = None) -> Path:
    """Run (or resume) every stage and write `out/report.md`; returns its path. `jobs`: training runs
    at once, each in a worker process with one torch thread (None: see pick_jobs). `threads`: torch
    threads of the stages that run in this process (SFT seed, reward model, evaluations); 1 by default,
    so that the demo's numbers do not depend on how many cores or jobs the machine has (float sums
    split over threads round differently, and the seed model would differ)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            # transformers' save_pretrained warns about its own deprecated attribute on every save
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return _run_demo(Path(out), quick, seed, settings, log, pick_jobs(jobs))
    finally:
        torch.set_num_threads(previous)


def _run_demo(out: Path, quick: bool, seed: int, settings: DemoSettings | None, log, jobs: int) -> Path:
    from . import pipeline as P
    from .report import demo_report

    st = settings or settings_for(quick)
    out.mkdir(parents=True, exist_ok=True)
    regimes, prefs = P.verifiable_regimes(st), P.preference_regimes(st)
    rl_seeds = [seed + k for k in range(st.rl_seeds)]
    runner = StageRunner(out, total=3 + len(regimes) * len(rl_seeds) + 1 + len(prefs) + 2,
                         **({"log": log} if log else {}))
    with runner:  # its worker processes stop at the end, or on an error
        say = runner.say
        start = time.perf_counter()
        import torch

        say(f"{'quick' if quick else 'full'} demo in {out}; seed {seed}; each regime: {st.rl_budget()} on "
            f"{st.rl_task}, training seeds {rl_seeds}; {torch.get_num_threads()} torch thread(s), "
            f"{jobs} training run(s) at once")

        # the seed (SFT) and the reward model only need the tiny model: they train side by side
        tiny, seeded, rm = tiny_seed_and_rm_stages(runner, out, st, seed, jobs)
        acc = seeded.result["accuracy"]
        say(f"  seed held-out accuracy on {st.rl_task}: {acc['mean']:.3f} ± {acc['se']:.3f} (greedy, "
            f"{st.num_eval} prompts); hidden-rule rate on preference prompts {seeded.result['hidden_rule']['mean']:.2f}")
        say(f"  reward model held-out pair accuracy: {rm.result['heldout_accuracy']:.3f} "
            f"({rm.result['heldout_pairs']} pairs)")
        seed_model = Path(seeded.result["model"])

        # every training run (and the seed's sampled score) is independent of the others: one pool,
        # `jobs` at once. The comparison's (regime, training seed) runs first, GRPO's (the longest) at
        # the head of the queue, then the short runs of the non-verifiable leg fill the gaps at the end.
        stages, slots = [], []
        for r in reversed(regimes):
            for rs in rl_seeds:
                folder = out / "runs" / r.slug / f"seed{rs}"
                raw = P.merge_dicts(P.base_config(st, seed_model, folder, rs), r.overrides)
                stages.append(Stage(f"{r.name}, training seed {rs}", folder,
                                    raw | {"final_eval": _pick(st, P.FINAL_EVAL_KEYS)},
                                    partial(P.stage_train_scored, raw=raw, st=st, seed=seed), (seeded,)))
                slots.append(r)
        rm_reward = {"kind": "model", "path": rm.result["model"]}
        for r in prefs:
            folder = out / "runs" / r.slug
            raw = P.merge_dicts(P.preference_config(st, seed_model, folder, seed, rm_reward), r.overrides)
            stages.append(Stage(f"{r.name} against the reward model", folder, raw,
                                partial(_train_and_rule, raw=raw, st=st, seed=seed), (seeded, rm)))
        folder = out / "runs" / "multitask_online_dpo"
        raw = _multitask_config(P, folder, st, seed_model, rm_reward, seed)
        stages.append(Stage("multi-task online DPO (arithmetic + preference in every batch)", folder,
                            raw | {"mixed_data": _pick(st, ("rl_task", "num_train", "mixed_eval_per_task"))},
                            partial(_multitask, raw=raw, st=st, seed=seed), (seeded, rm)))
        stages.append(Stage("seed: sampled held-out evaluation", out / "seed_eval",
                            _pick(st, P.FINAL_EVAL_KEYS) | {"seed": seed},
                            partial(P.sampled_score, seed_model, st, seed), (seeded,)))
        done = runner.run_many(stages, jobs)
        done, (*pref_results, mixed, seed_sampled) = done[:len(slots)], done[len(slots):]
        say(f"  seed {P.sampled_label(st)}: {seed_sampled.result['mean']:.3f} ± {seed_sampled.result['se']:.3f}")
        comparison = [(r, [res for slot, res in zip(slots, done) if slot is r]) for r in regimes]
        for res in done:
            _say_result(say, res, extra=f"{P.sampled_label(st)} {res.result['sampled']['mean']:.3f}")
        preference = list(zip(prefs, pref_results))
        for _, res in preference:
            _say_result(say, res, extra=f"hidden-rule rate {res.result['hidden_rule']['mean']:.2f}")
        _say_result(say, mixed)

        models = {"seed": seed_model,
                  "online DPO, arithmetic only": _final({r: res[0] for r, res in comparison}, "online_dpo"),
                  "online DPO, preference only": _final(dict(preference), "pref_online_dpo"),
                  "online DPO, mixed": mixed.folder / "final"}
        cross = runner.run("cross-task evaluation (the multi-task table)", out / "cross_eval",
                           {"models": {k: str(v) for k, v in models.items()}, "seed": seed,
                            "n": st.mixed_eval_per_task},
                           lambda f: _cross_eval(P, f, st, models, rm_reward, seed),
                           deps=[seeded, rm, mixed] + [res for _, res in preference] + [res for _, rs in comparison for res in rs])

        summary = P.demo_summary(st, seed_sampled.result, seeded.result["accuracy"], comparison)
        path, tables = demo_report(out, st, seed, quick, runner, comparison, preference, mixed, cross, summary,
                                   time.perf_counter() - start, jobs)
        say(f"all stages done in {time.perf_counter() - start:.0f} s (this invocation); report: {path}")
        for title, table in tables:
            print(f"\n{title}\n{table.text()}", flush=True)
        return path


def tiny_and_seed_stages(runner: StageRunner, out: Path, st: DemoSettings, seed: int):
    """The tiny model and its SFT seed, as cached stages under `out` (shared with bench/optune.py)."""
    tiny = _tiny_stage(runner, out, st, seed)
    return tiny, runner.run_many([_seed_stage(out, st, seed, tiny)])[0]


def tiny_seed_and_rm_stages(runner: StageRunner, out: Path, st: DemoSettings, seed: int, jobs: int):
    """The tiny model, then its SFT seed and the reward model (both start from it) side by side."""
    tiny = _tiny_stage(runner, out, st, seed)
    from . import pipeline as P

    rm = Stage("reward model (Bradley-Terry on builtin:preference)", out / "reward_model",
               _pick(st, ("rm_steps", "rm_batch", "rm_lr")) | {"seed": seed},
               partial(P.stage_reward_model, st=st, tiny=tiny.folder, seed=seed), (tiny,))
    seeded, rm = runner.run_many([_seed_stage(out, st, seed, tiny), rm], jobs)
    return tiny, seeded, rm


def _tiny_stage(runner: StageRunner, out: Path, st: DemoSettings, seed: int) -> StageResult:
    from . import pipeline as P

    tiny = runner.run("tiny model", out / "tiny", {"arch": st.arch, "size": st.size, "seed": seed},
                      lambda f: P.stage_tiny(f, st, seed))
    runner.say(f"  {st.arch}/{st.size}: {tiny.result['params'] / 1e6:.2f} M parameters, saved and loaded back")
    return tiny


def _seed_stage(out: Path, st: DemoSettings, seed: int, tiny: StageResult) -> Stage:
    from . import pipeline as P

    seed_keys = ("sft_task", "sft_rows", "sft_steps", "sft_lr", "sft_batch", "preference_share",
                 "preference_keyword_share", "rl_task", "num_eval", "max_new_tokens", "mixed_eval_per_task")
    return Stage(f"seed: SFT on {st.sft_task} ({st.sft_steps} steps)", out / "seed", _pick(st, seed_keys) | {"seed": seed},
                 partial(P.stage_seed, st=st, tiny=tiny.folder, seed=seed), (tiny,))


def _pick(st: DemoSettings, keys: tuple[str, ...]) -> dict:
    d = st.to_dict()
    return {k: d[k] for k in keys}


def _final(results: dict, slug: str) -> Path:
    res = next(res for r, res in results.items() if r.slug == slug)
    return res.folder / "final"


def _say_result(say, res: StageResult, extra: str = "") -> None:
    r = res.result
    parts = [f"held-out {r['eval/score']:.3f} ± {r['eval/score_se']:.3f}"]
    for k in sorted(r):
        if k.count("/") == 2 and k.endswith("/score"):
            parts.append(f"{k.split('/')[1]} {r[k]:.3f}")
    if extra:
        parts.append(extra)
    say("  " + ", ".join(parts) + f" [{res.wall_s:.0f} s{', cached' if res.cached else ''}]")


def _train_and_rule(folder: Path, raw: dict, st: DemoSettings, seed: int) -> dict:
    from . import pipeline as P

    result = P.stage_train(folder, raw)
    rule = P.evaluate_model(folder / "final", "builtin:preference", {"preference": P.HIDDEN_RULE},
                            st.mixed_eval_per_task, st.max_new_tokens, seed, folder / "eval_hidden_rule")
    est = P.estimate(rule)
    P.write_summary(folder, {"hidden rule": est})
    return result | {"hidden_rule": est}


def _multitask_config(P, folder: Path, st: DemoSettings, seed_model: Path, rm_reward: dict, seed: int) -> dict:
    """Online DPO on a jsonl mixing both tasks (written by the stage into its folder)."""
    return P.merge_dicts(P.base_config(st, seed_model, folder, seed), {
        "algo": {"name": "dpo", "beta": st.dpo_beta}, "reference": {"sync": "with_generator"},
        "data": {"train": str(folder / "mixed_train.jsonl"), "eval": str(folder / "mixed_heldout.jsonl")},
        "rewards": {"tasks": {"arithmetic": {"kind": "math"}, "preference": rm_reward}},
        "eval": {"max_prompts": 2 * st.mixed_eval_per_task}, "train": {"steps": st.multitask_steps}})


def _multitask(folder: Path, raw: dict, st: DemoSettings, seed: int) -> dict:
    from . import pipeline as P

    P.write_mixed_data(folder, st, seed)
    return P.stage_train(folder, raw)


def _cross_eval(P, folder: Path, st: DemoSettings, models: dict, rm_reward: dict, seed: int) -> dict:
    """Each model on both tasks' held-out prompts (arithmetic accuracy, reward-model score) and the
    hidden-rule rate of its replies: the paper's multi-task table, in small."""
    _, heldout = P.write_mixed_data(folder, st, seed)
    rewards = {"arithmetic": {"kind": "math"}, "preference": rm_reward}
    table = {}
    for name, path in models.items():
        m = P.evaluate_model(path, str(heldout), rewards, 2 * st.mixed_eval_per_task, st.max_new_tokens, seed,
                             folder / "scratch")
        rule = P.evaluate_model(path, "builtin:preference", {"preference": P.HIDDEN_RULE}, st.mixed_eval_per_task,
                                st.max_new_tokens, seed, folder / "scratch")
        table[name] = {"arithmetic": P.estimate(m, "eval/arithmetic/score"),
                       "preference": P.estimate(m, "eval/preference/score"), "hidden rule": P.estimate(rule)}
    return table
