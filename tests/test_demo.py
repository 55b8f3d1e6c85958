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
    pref_steps=2, mixed_eval_per_task=3)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs: list[str] = []
    run_demo(out, seed=0, settings=TOY, log=logs.append)
    return out, logs


def test_every_stage_runs_and_the_report_is_written(demo_dir):
    out, logs = demo_dir
    slugs = [r.slug for r in verifiable_regimes(TOY) + preference_regimes(TOY)] + ["multitask_online_dpo"]
    for slug in slugs:
        lines = [json.loads(x) for x in (out / "runs" / slug / "metrics.jsonl").read_text().splitlines()]
        expected = TOY.pref_steps if slug.startswith("pref_") else TOY.steps
        assert [m["step"] for m in lines if "reward/mean" in m] == list(range(1, expected + 1))
        assert lines[-1].get("final") and "eval/score" in lines[-1]
        assert (out / "runs" / slug / "final" / "config.json").exists()
        assert (out / "runs" / slug / "demo_config.yaml").exists()  # the exact config, rerunnable by hand
    assert (out / "tiny" / "config.json").exists() and (out / "seed" / "model" / "config.json").exists()
    rm = json.loads((out / "reward_model" / MARKER).read_text())["result"]
    assert 0.0 <= rm["heldout_accuracy"] <= 1.0
    report = (out / "report.md").read_text()
    for name in ("offline DPO", "semi-online DPO (s=3)", "online DPO (s=1)", "GRPO", "OPTune", "GRPO + VI",
                 "online DPO, mixed", "hidden rule"):
        assert name in report, name
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert any(p.endswith("heldout_score.png") for p in pngs) and any(p.endswith("entropy.png") for p in pngs)
    assert len(pngs) >= 8  # four metrics × (verifiable leg, reward-model leg) at least
    assert sum("..." in line for line in logs) == 14  # every stage announced itself and ran


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
    cfgs = {r.slug: yaml.safe_load((out / "runs" / r.slug / "config.yaml").read_text()) for r in verifiable_regimes(TOY)}
    seeds = {c["model"]["path"] for c in cfgs.values()}
    assert len(seeds) == 1 and seeds.pop().endswith("seed/model")
    assert {(c["train"]["steps"], c["data"]["prompts_per_step"], c["rollout"]["n"]) for c in cfgs.values()} == {
        (TOY.steps, TOY.prompts_per_step, TOY.n)}
    assert cfgs["offline_dpo"]["rollout"]["sync_every"] == 0 and cfgs["online_dpo"]["rollout"]["sync_every"] == 1
    assert cfgs["optune"]["algo"]["optune"]["rho"] == TOY.optune_rho


def test_second_run_is_all_cached_and_a_changed_setting_reruns_only_what_depends_on_it(demo_dir):
    out, _ = demo_dir
    logs: list[str] = []
    run_demo(out, seed=0, settings=TOY, log=logs.append)
    assert not any(line.endswith("...") for line in logs)
    assert sum("cached" in line for line in logs if "] [" in line) == 14
    logs.clear()
    run_demo(out, seed=0, settings=replace(TOY, pref_steps=3), log=logs.append)
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
