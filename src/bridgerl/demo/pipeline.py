"""The demo's stages: tiny model → seed (SFT) → the regime comparison → reward model → the
non-verifiable leg (online DPO / GRPO / GRPO + VI against the reward model, and a multi-task run)
→ report. Every stage is an ordinary bridgerl command's code path (make_tiny_model, sft,
train_reward_model, train, evaluate) on folders that a user can open and rerun by hand."""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.tasks import builtin_rows, hidden_rule_score
from .settings import DemoSettings, config_from

__all__ = ["Regime", "merge_dicts", "config_from", "verifiable_regimes", "preference_regimes", "hidden_rule_reward",
           "evaluate_model", "base_config", "preference_config", "stage_tiny", "stage_seed", "stage_reward_model", "stage_train"]


def hidden_rule_reward(completions, **_) -> list[float]:
    """The preference data's hidden rule as a reward: used only to measure what the policy learnt
    from the reward model, never to train."""
    return [hidden_rule_score(c if isinstance(c, str) else str(c)) for c in completions]


HIDDEN_RULE = {"kind": "python", "function": "bridgerl.demo.pipeline:hidden_rule_reward", "binary": True}


class Regime:
    """One training run of the comparison: a display name, a folder name and config overrides."""

    def __init__(self, name: str, slug: str, overrides: dict):
        self.name, self.slug, self.overrides = name, slug, overrides


def verifiable_regimes(st: DemoSettings) -> list[Regime]:
    """Offline, semi-online (one per `st.semi_online`), online DPO and GRPO: same seed, steps, prompts,
    samples. OPTune is not among them: the full demo's time budget holds three training seeds of five
    regimes, and bench/optune.py measures OPTune against online DPO on the same seed model."""
    dpo = {"name": "dpo", "beta": st.dpo_beta}
    synced = {"sync": "with_generator"}  # the paper syncs the DPO reference with the generator on math
    semi = [Regime(f"semi-online DPO (s={s})", f"semi_online_dpo_s{s}",
                   {"algo": dpo, "rollout": {"sync_every": s}, "reference": synced})
            for s in sorted(st.semi_online, reverse=True)]
    return [
        Regime("offline DPO", "offline_dpo", {"algo": dpo, "rollout": {"sync_every": 0}}),
        *semi,
        Regime("online DPO (s=1)", "online_dpo", {"algo": dpo, "rollout": {"sync_every": 1}, "reference": synced}),
        Regime("GRPO", "grpo", {"algo": {"name": "grpo", "beta": st.grpo_beta}, "rollout": {"sync_every": 1}}),
    ]


def preference_regimes(st: DemoSettings) -> list[Regime]:
    """Against the reward model: rewards are real numbers, so GRPO's variance increase acts."""
    grpo = {"name": "grpo", "beta": st.grpo_beta}
    return [
        Regime("online DPO (s=1)", "pref_online_dpo", {"algo": {"name": "dpo", "beta": st.dpo_beta}}),
        Regime("GRPO", "pref_grpo", {"algo": grpo}),
        Regime("GRPO + VI", "pref_grpo_vi", {"algo": dict(grpo, grpovi={})}),
    ]


def merge_dicts(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_config(st: DemoSettings, model: Path, out_dir: Path, seed: int) -> dict:
    """The settings every comparison run shares (a plain dict, validated by load_config)."""
    return {
        "model": {"path": str(model)},
        "rollout": {"n": st.n, "max_new_tokens": st.max_new_tokens, "temperature": st.rollout_temperature,
                    "sync_every": 1},
        "data": {"train": f"builtin:{st.rl_task}", "num_train": st.num_train, "num_eval": st.num_eval,
                 "prompts_per_step": st.prompts_per_step},
        "rewards": {"tasks": {"arithmetic": {"kind": "math"}}},
        "optim": {"lr": st.lr, "adam_eps": st.adam_eps, "grad_clip": st.grad_clip, "warmup_steps": st.warmup_steps},
        "train": {"steps": st.steps, "seed": seed, "out_dir": str(out_dir), "micro_batch": 64},
        "eval": {"every": st.eval_every, "max_prompts": st.num_eval, "max_new_tokens": st.max_new_tokens,
                 "temperature": st.eval_temperature, "top_p": st.eval_top_p},
        "log": {"tensorboard": False, "progress": True},
    }


def preference_config(st: DemoSettings, model: Path, out_dir: Path, seed: int, rm_reward: dict) -> dict:
    """base_config for the non-verifiable leg: preference prompts scored by the reward model."""
    return merge_dicts(base_config(st, model, out_dir, seed), {
        "data": {"train": "builtin:preference", "num_eval": st.mixed_eval_per_task},
        "rewards": {"tasks": {"preference": rm_reward}}, "train": {"steps": st.pref_steps},
        "eval": {"max_prompts": st.mixed_eval_per_task}})


def evaluate_model(model: Path, data: str, rewards: dict, num: int, max_new_tokens: int, seed: int,
                   scratch: Path) -> dict:
    """Greedy held-out score of a model folder: `bridgerl eval`'s code path (build_run + evaluate)."""
    from ..train.evaluate import evaluate
    from ..train.run import build_run

    raw = {"model": {"path": str(model)}, "rewards": {"tasks": rewards},
           "data": {"train": data, "num_train": 1, "num_eval": num},
           "eval": {"max_prompts": num, "max_new_tokens": max_new_tokens},
           "train": {"seed": seed, "out_dir": str(scratch)}, "log": {"tensorboard": False, "progress": False}}
    if not data.startswith("builtin:"):
        raw["data"]["eval"] = data
    return evaluate(build_run(config_from(raw, scratch / "eval_config.yaml")))


def estimate(metrics: dict, key: str = "eval/score") -> dict:
    return {"mean": metrics[key], "se": metrics.get(key + "_se", metrics.get(key.removesuffix("score") + "score_se"))}


# ---- stages ------------------------------------------------------------------------------------


def stage_tiny(folder: Path, st: DemoSettings, seed: int) -> dict:
    """Build the tiny model with the factory, save it, and load it back the way every later stage will."""
    from transformers import AutoModelForCausalLM

    from ..models import make_tiny_model

    make_tiny_model(folder, st.arch, st.size, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "arch": st.arch, "size": st.size}


def write_seed_data(path: Path, st: DemoSettings, seed: int) -> dict:
    """SFT rows: worked solutions of the verifiable task, plus replies to the preference prompts of
    which only a small share follows the hidden rule (so RL against the reward model has room)."""
    n_pref = int(round(st.sft_rows * st.preference_share))
    arith = builtin_rows(st.sft_task, st.sft_rows - n_pref, seed, "train")
    rng = random.Random(f"bridgerl/demo/seed-data/{seed}")
    rows = [{"prompt": r["prompt"], "completion": r["solution"], "task": r["task"]} for r in arith]
    for r in (builtin_rows("preference", n_pref, seed, "train") if n_pref else []):
        reply = r["chosen"] if rng.random() < st.preference_keyword_share else r["rejected"]
        rows.append({"prompt": r["prompt"], "completion": reply, "task": "preference"})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "arithmetic": len(arith), "preference": n_pref}


def stage_seed(folder: Path, st: DemoSettings, tiny: Path, seed: int) -> dict:
    from ..config import SFTConfig
    from ..supervised.sft import sft

    data = folder / "sft_data.jsonl"
    counts = write_seed_data(data, st, seed)
    cfg = SFTConfig.model_validate({
        "model": {"path": str(tiny)}, "data": {"train": str(data)}, "steps": st.sft_steps, "batch_size": st.sft_batch,
        "optim": {"lr": st.sft_lr, "schedule": "cosine", "warmup_steps": 10}, "seed": seed,
        "out_dir": str(folder / "model")})
    model = sft(cfg)
    log = [json.loads(x) for x in (model / "sft_metrics.jsonl").read_text().splitlines()]
    acc = evaluate_model(model, f"builtin:{st.rl_task}", {"arithmetic": {"kind": "math"}}, st.num_eval,
                         st.max_new_tokens, seed, folder / "eval")
    rule = evaluate_model(model, "builtin:preference", {"preference": HIDDEN_RULE}, st.mixed_eval_per_task,
                          st.max_new_tokens, seed, folder / "eval")
    return {"data": counts, "final_loss": log[-1]["loss"], "accuracy": estimate(acc),
            "hidden_rule": estimate(rule), "model": str(model)}


def stage_reward_model(folder: Path, st: DemoSettings, tiny: Path, seed: int) -> dict:
    from ..config import RMConfig
    from ..supervised.rm import train_reward_model

    cfg = RMConfig.model_validate({
        "model": {"path": str(tiny)}, "data": "builtin:preference", "steps": st.rm_steps, "batch_size": st.rm_batch,
        "optim": {"lr": st.rm_lr, "schedule": "cosine", "warmup_steps": 10}, "seed": seed,
        "out_dir": str(folder / "model")})
    path, metrics = train_reward_model(cfg)
    return {"model": str(path), "heldout_accuracy": metrics["rm/heldout_accuracy"],
            "heldout_pairs": metrics["rm/heldout_pairs"]}


def stage_train(folder: Path, raw: dict) -> dict:
    """One `bridgerl train` run into `folder`; returns its final held-out metrics."""
    from ..train.loop import train

    run = train(config_from(raw, folder / "demo_config.yaml"))
    final = [json.loads(x) for x in (run.out_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return {k: v for k, v in final.items() if k.startswith("eval/")} | {"steps": run.step}


FINAL_EVAL_KEYS = ("rl_task", "num_eval", "final_samples", "final_temperature", "max_new_tokens")


def sampled_label(st: DemoSettings) -> str:
    return f"sampled held-out accuracy (T={st.final_temperature}, {st.final_samples} samples × {st.num_eval} prompts)"


def sampled_score(model: Path, st: DemoSettings, seed: int, scratch: Path) -> dict:
    """The headline measure for one model: the same prompts and random stream for every model."""
    from .evaluation import evaluate_sampled

    return evaluate_sampled(model, f"builtin:{st.rl_task}", {"arithmetic": {"kind": "math"}}, st.num_eval,
                            st.final_samples, st.final_temperature, 1.0, st.max_new_tokens, seed, scratch)


def stage_train_scored(folder: Path, raw: dict, st: DemoSettings, seed: int) -> dict:
    """stage_train, then the final model's sampled score and the run's cost (tokens, step time)."""
    from ..report import load_run

    result = stage_train(folder, raw)
    run = load_run(folder)
    return result | {"sampled": sampled_score(folder / "final", st, seed, folder / "eval_sampled"),
                     "generated_tokens": run.total("tokens/generated"), "trained_tokens": run.total("tokens/trained"),
                     "wall_s": run.wall_s}


def demo_summary(st: DemoSettings, seed_sampled: dict, seed_greedy: dict, comparison: list) -> dict:
    """summary.json's content (report/summary.py has the schema): one entry per regime, its final
    sampled score per training seed, their mean ± SE, and the greedy scores beside them."""
    from ..report.summary import across_seeds

    regimes = []
    for regime, results in comparison:
        cfg = merge_dicts({"rollout": {"sync_every": 1}}, regime.overrides)
        finals = [r.result["sampled"]["mean"] for r in results]
        greedy = [r.result["eval/score"] for r in results]
        mean, se = across_seeds(finals)
        g_mean, g_se = across_seeds(greedy)
        entry = {"name": regime.name, "algo": cfg["algo"]["name"], "sync_every": cfg["rollout"]["sync_every"],
                 "steps": st.steps, "seeds": [int(r.folder.name.removeprefix("seed")) for r in results],
                 "final": finals, "mean": mean, "se": se,
                 "greedy": {"final": greedy, "mean": g_mean, "se": g_se}}
        if "optune" in cfg["algo"]:
            entry["optune"] = cfg["algo"]["optune"]
        for key in ("generated_tokens", "trained_tokens", "wall_s"):
            entry[key] = sum(r.result[key] for r in results) / len(results)
        regimes.append(entry)
    return {"task": st.rl_task, "metric": sampled_label(st),
            "seed_model": {"mean": seed_sampled["mean"], "se": seed_sampled["se"],
                           "greedy": {"mean": seed_greedy["mean"], "se": seed_greedy["se"]}},
            "budget": st.rl_budget(), "lr": st.lr, "warmup_steps": st.warmup_steps, "regimes": regimes}


def write_summary(run_dir: Path, values: dict) -> None:
    """Measurements made after training, shown as extra columns by the report."""
    path = run_dir / "summary.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(old | values, indent=2))


def write_mixed_data(folder: Path, st: DemoSettings, seed: int) -> tuple[Path, Path]:
    """Train and held-out jsonl files mixing the verifiable task and the preference prompts: each row
    keeps its `task`, so the router scores it with its own reward."""
    train = builtin_rows(st.rl_task, st.num_train, seed, "train")
    train += builtin_rows("preference", st.num_train, seed, "train")
    random.Random(f"bridgerl/demo/mixed/{seed}").shuffle(train)
    held = builtin_rows(st.rl_task, st.mixed_eval_per_task, seed, "test")
    held += builtin_rows("preference", st.mixed_eval_per_task, seed, "test")
    keep = ("prompt", "answer", "task")
    paths = folder / "mixed_train.jsonl", folder / "mixed_heldout.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in rows))
    return paths
