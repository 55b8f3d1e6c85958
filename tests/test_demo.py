"""The demo end to end at toy size (every stage: tiny model, SFT seed, each regime, reward model, the
reward-model leg, multi-task, cross evaluation, report), its stage cache, and the SmolLM2 helper's
pure parts. The real `--quick` demo takes minutes, so it is not run here."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from bridgerl.demo import FULL, QUICK, run_demo
from bridgerl.demo.pipeline import hidden_rule_reward, preference_regimes, verifiable_regimes, write_seed_data
from bridgerl.demo.stages import MARKER, StageRunner

TOY = replace(
    FULL, size="nano", sft_rows=48, sft_steps=6, sft_batch=8, preference_share=0.25, steps=2, prompts_per_step=2,
    n=2, max_new_tokens=6, semi_online=(2, 3), eval_every=1, num_eval=4, num_train=8, rm_steps=3, rm_batch=4,
    pref_steps=2, multitask_steps=3, mixed_eval_per_task=3, rl_seeds=2, final_samples=2)
STAGES = 3 + 5 * TOY.rl_seeds + 1 + 3 + 2  # tiny, seed, seed eval; regimes × seeds; RM; RM leg; multitask, cross


def run_folders(out, toy=TOY):
    """Every training run folder of the demo: each verifiable regime once per training seed."""
    folders = [out / "runs" / r.slug / f"seed{k}" for r in verifiable_regimes(toy) for k in range(toy.rl_seeds)]
    return folders + [out / "runs" / r.slug for r in preference_regimes(toy)] + [out / "runs" / "multitask_online_dpo"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs: list[str] = []
    run_demo(out, seed=0, settings=TOY, log=logs.append, threads=1, jobs=2)  # training runs in 2 worker processes
    return out, logs


def test_every_stage_runs_and_the_report_is_written(demo_dir):
    out, logs = demo_dir
    for folder in run_folders(out):
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        expected = (TOY.pref_steps if folder.name.startswith("pref_") else
                    TOY.multitask_steps if folder.name.startswith("multitask") else TOY.steps)
        assert [m["step"] for m in lines if "reward/mean" in m] == list(range(1, expected + 1))
        assert lines[-1].get("final") and "eval/score" in lines[-1]
        assert (folder / "final" / "config.json").exists()
        assert (folder / "demo_config.yaml").exists()  # the exact config, rerunnable by hand
    assert (out / "tiny" / "config.json").exists() and (out / "seed" / "model" / "config.json").exists()
    rm = json.loads((out / "reward_model" / MARKER).read_text())["result"]
    assert 0.0 <= rm["heldout_accuracy"] <= 1.0
    report = (out / "report.md").read_text()
    for name in ("offline DPO", "semi-online DPO (s=3)", "online DPO (s=1)", "GRPO", "GRPO + VI",
                 "online DPO, mixed", "hidden rule"):
        assert name in report, name
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert any(p.endswith("heldout_score.png") for p in pngs) and any(p.endswith("entropy.png") for p in pngs)
    assert len(pngs) >= 9  # four metrics × (verifiable leg, reward-model leg) at least, and held-out vs s
    assert "heldout_vs_sync_every.png" in pngs and "(plots/heldout_vs_sync_every.png)" in report
    assert sum("..." in line for line in logs) == STAGES  # every stage announced itself and ran


def test_summary_json_holds_every_regime_over_its_seeds_and_heads_the_report(demo_dir):
    from bridgerl.report.summary import read_summary

    out, _ = demo_dir
    summary = read_summary(out)
    assert summary["task"] == TOY.rl_task
    regimes = {r["name"]: r for r in summary["regimes"]}
    assert list(regimes) == [r.name for r in verifiable_regimes(TOY)]
    assert regimes["offline DPO"]["sync_every"] == 0 and regimes["online DPO (s=1)"]["sync_every"] == 1
    assert regimes["GRPO"]["algo"] == "grpo" and regimes["semi-online DPO (s=3)"]["sync_every"] == 3
    for r in summary["regimes"]:
        assert r["seeds"] == [0, 1] and r["steps"] == TOY.steps and len(r["final"]) == 2
        # each seed's score is the stage's own sampled evaluation of that seed's final model
        for k, value in zip(r["seeds"], r["final"]):
            slug = next(g.slug for g in verifiable_regimes(TOY) if g.name == r["name"])
            stage = json.loads((out / "runs" / slug / f"seed{k}" / MARKER).read_text())["result"]
            assert value == stage["sampled"]["mean"] and stage["sampled"]["samples"] == TOY.final_samples
        assert abs(r["mean"] - sum(r["final"]) / 2) < 1e-12
        assert abs(r["se"] - abs(r["final"][0] - r["final"][1]) / 2) < 1e-12  # SE of two values: |a − b| / 2
        assert r["generated_tokens"] > 0 and r["wall_s"] > 0
    first = (out / "report.md").read_text().splitlines()[2]
    assert first.startswith("**Over the seed model") and "online DPO" in first and "offline DPO" in first


def test_the_multitask_run_scores_each_task_with_its_own_reward(demo_dir):
    out, _ = demo_dir
    final = [json.loads(x) for x in (out / "runs" / "multitask_online_dpo" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "eval/arithmetic/score" in final and "eval/preference/score" in final
    assert final["eval/arithmetic/score"] in {k / TOY.mixed_eval_per_task for k in range(TOY.mixed_eval_per_task + 1)}
    cross = json.loads((out / "cross_eval" / MARKER).read_text())["result"]
    assert set(cross) == {"seed", "online DPO, arithmetic only", "online DPO, preference only", "online DPO, mixed"}


def test_regimes_share_the_seed_and_budget(demo_dir):
    import yaml

    out, _ = demo_dir
    cfgs = {f"{r.slug}/{k}": yaml.safe_load((out / "runs" / r.slug / f"seed{k}" / "config.yaml").read_text())
            for r in verifiable_regimes(TOY) for k in range(TOY.rl_seeds)}
    assert {c["train"]["seed"] for c in cfgs.values()} == set(range(TOY.rl_seeds))
    seeds = {c["model"]["path"] for c in cfgs.values()}
    assert len(seeds) == 1 and seeds.pop().endswith("seed/model")
    assert {(c["train"]["steps"], c["data"]["prompts_per_step"], c["rollout"]["n"]) for c in cfgs.values()} == {
        (TOY.steps, TOY.prompts_per_step, TOY.n)}
    assert cfgs["offline_dpo/0"]["rollout"]["sync_every"] == 0 and cfgs["online_dpo/1"]["rollout"]["sync_every"] == 1


def test_second_run_is_all_cached_and_a_changed_setting_reruns_only_what_depends_on_it(demo_dir):
    out, _ = demo_dir
    logs: list[str] = []
    run_demo(out, seed=0, settings=TOY, log=logs.append, threads=1, jobs=1)
    assert not any(line.endswith("...") for line in logs)
    assert sum("cached" in line for line in logs if "] [" in line) == STAGES
    logs.clear()
    run_demo(out, seed=0, settings=replace(TOY, pref_steps=3), log=logs.append, threads=1, jobs=2)
    reran = [line for line in logs if "settings changed" in line]
    assert len(reran) == len(preference_regimes(TOY)) + 1  # the reward-model leg runs, plus the cross evaluation
    assert all("against the reward model" in line or "cross-task" in line for line in reran)


def test_stage_runner_reruns_a_killed_stage(tmp_path):
    calls = []

    def work(folder: Path) -> dict:
        calls.append(folder)
        (folder / "file").write_text("x")
        return {"ok": 1}

    runner = StageRunner(tmp_path, total=1, log=lambda m: None)
    runner.run("a", tmp_path / "a", {"k": 1}, work)
    (tmp_path / "a" / MARKER).unlink()  # as if killed before the marker was written
    (tmp_path / "a" / "stale").write_text("from the killed run")
    res = StageRunner(tmp_path, total=1, log=lambda m: None).run("a", tmp_path / "a", {"k": 1}, work)
    assert len(calls) == 2 and not res.cached and not (tmp_path / "a" / "stale").exists()
    res = StageRunner(tmp_path, total=1, log=lambda m: None).run("a", tmp_path / "a", {"k": 1}, work)
    assert res.cached and res.result == {"ok": 1} and len(calls) == 2
    with pytest.raises(ValueError, match="outside"):
        StageRunner(tmp_path / "a", total=1, log=lambda m: None).run("b", tmp_path / "b", {}, work)


def _pid_stage(folder: Path, value: int) -> dict:
    """A stage for run_many's worker processes (module level, so it pickles)."""
    import os

    import torch

    if value < 0:
        raise ValueError("negative")
    print("hello from the worker")
    return {"value": value * 2, "pid": os.getpid(), "threads": torch.get_num_threads()}


def test_run_many_runs_stages_in_worker_processes_in_order_and_caches_them(tmp_path):
    import os
    from functools import partial

    from bridgerl.demo.stages import Stage

    stages = [Stage(f"s{k}", tmp_path / f"s{k}", {"k": k}, partial(_pid_stage, value=k)) for k in range(3)]
    with StageRunner(tmp_path, total=5, log=lambda m: None) as runner:
        res = runner.run_many(stages, jobs=2)
        later = runner.run_many([Stage(f"t{k}", tmp_path / f"t{k}", {"k": k}, partial(_pid_stage, value=k))
                                 for k in range(2)], jobs=2)
        workers = runner._pool._processes.copy()
    assert [r.result["value"] for r in res] == [0, 2, 4]  # the order of `stages`, whatever finished first
    assert all(r.result["pid"] != os.getpid() and r.result["threads"] == 1 for r in res)
    assert "hello from the worker" in (tmp_path / "s1" / "stage.log").read_text()
    # the second call ran in the same worker processes (no second torch import), and leaving the
    # `with` block stopped them
    assert len(workers) == 2 and {r.result["pid"] for r in res + later} <= set(workers)
    assert runner._pool is None and all(not p.is_alive() for p in workers.values())
    again = StageRunner(tmp_path, total=3, log=lambda m: None).run_many(stages, jobs=2)
    assert all(r.cached for r in again) and [r.result for r in again] == [r.result for r in res]
    bad = [Stage("bad", tmp_path / "bad", {}, partial(_pid_stage, value=-1)),
           Stage("s3", tmp_path / "s3", {"k": 3}, partial(_pid_stage, value=3))]
    with pytest.raises(RuntimeError, match="stage 'bad' failed.*stage.log"):
        StageRunner(tmp_path, total=2, log=lambda m: None).run_many(bad, jobs=2)
    assert not (tmp_path / "bad" / MARKER).exists()


def test_a_run_in_a_worker_process_equals_the_same_run_in_process(demo_dir, tmp_path):
    """The demo's parallel runs are the runs `bridgerl train demo_config.yaml` makes (one thread)."""
    import torch
    import yaml

    from bridgerl.config import load_config
    from bridgerl.train.loop import train

    out, _ = demo_dir
    folder = out / "runs" / "online_dpo" / "seed1"
    raw = yaml.safe_load((folder / "demo_config.yaml").read_text())
    raw["train"]["out_dir"] = str(tmp_path / "again")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(tmp_path / "c.yaml"))
    finally:
        torch.set_num_threads(previous)

    def metrics(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/s"))} for r in rows]

    assert metrics(tmp_path / "again") == metrics(folder)


def test_seed_data_mixes_tasks_with_a_minority_following_the_hidden_rule(tmp_path):
    st = replace(FULL, sft_rows=2000, preference_share=0.25, preference_keyword_share=0.15)
    counts = write_seed_data(tmp_path / "d.jsonl", st, seed=0)
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    pref = [r for r in rows if r["task"] == "preference"]
    assert counts["preference"] == len(pref) == 500 and len(rows) == 2000
    rate = sum(hidden_rule_reward([r["completion"] for r in pref])) / len(pref)
    assert 0.10 < rate < 0.20
    assert all("\\boxed" in r["completion"] for r in rows if r["task"] == "arithmetic")


def test_quick_is_smaller_than_full():
    assert QUICK.steps < FULL.steps and QUICK.sft_steps <= FULL.sft_steps and QUICK.pref_steps < FULL.pref_steps
    assert QUICK.multitask_steps < FULL.multitask_steps


def test_one_regime_per_semi_online_value_between_offline_and_online():
    slugs = lambda st: [r.slug for r in verifiable_regimes(st)]  # noqa: E731
    assert slugs(FULL) == ["offline_dpo", "semi_online_dpo_s20", "semi_online_dpo_s5", "online_dpo", "grpo"]
    assert slugs(QUICK) == ["offline_dpo", "semi_online_dpo_s5", "online_dpo", "grpo"]
    assert [r.overrides["rollout"]["sync_every"] for r in verifiable_regimes(replace(QUICK, semi_online=(3, 7)))] \
        == [0, 7, 3, 1, 1]


def test_smollm2_config_validates_and_routes_the_reasoning_gym_task(tmp_path):
    from bridgerl.demo.smollm2 import RG_TASK, smollm2_config
    from bridgerl.demo.pipeline import config_from

    cfg = config_from(smollm2_config(tmp_path / "model", tmp_path / "run"), tmp_path / "c.yaml")
    assert cfg.algo.name == "grpo" and cfg.data.train.startswith(f"builtin:rg:{RG_TASK}")
    assert cfg.rewards.tasks[f"rg:{RG_TASK}"].kind == "reasoning_gym"
    example = Path(__file__).parents[1] / "examples" / "smollm2_grpo.yaml"
    if example.exists():
        from bridgerl.config import load_config

        ex = load_config(example)
        assert ex.data.train == cfg.data.train and ex.algo.name == "grpo"
