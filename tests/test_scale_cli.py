"""The command line with more than one process: `bridgerl train examples/grpo.yaml --nproc 2` (torchrun,
2 gloo ranks, FSDP2) and `... rollout.workers=2` (Ray generator actors) each train 3 steps, and the
2-rank run logs the single-process run's numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=3", "data.prompts_per_step=4", "data.num_eval=4", "rollout.n=4", "rollout.max_new_tokens=12", "eval.every=0",
         "train.micro_batch=4", "log.progress=false"]


def _metrics(out: Path) -> list[dict]:
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


# A tiny untrained model never solves arithmetic: a length-based reward gives the groups a spread, so
# every step really updates.
LENGTH_REWARD = "def reward(completions, **_):\n    return [len(c) % 5 / 4 for c in completions]\n"
SPREAD = ["rewards.tasks.arithmetic.kind=python", "rewards.tasks.arithmetic.function=spread_reward:reward"]


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "spread_reward.py").write_text(LENGTH_REWARD)
    path = os.pathsep.join([str(ROOT / "src"), str(tmp_path)])
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bridgerl.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_nproc_2_trains_3_steps_like_one_process(tmp_path, tiny_model_dir):
    common = ["train", "examples/grpo.yaml", f"model.path={tiny_model_dir}", *SMALL, *SPREAD]
    two = _cli([*common, "--nproc", "2", "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "torchrun --standalone --nproc_per_node=2 -m bridgerl.cli train" in two.stdout
    one = _cli([*common, "--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in b] == [1, 2, 3]
    assert not any(m.get("update/skipped") for m in b)
    # Step 1 samples from the same seed model with the same rng: same rollouts, same rewards, and the
    # update equals the single-process one (summed gradients; float32 rounding of the sum order).
    assert b[0]["reward/mean"] == a[0]["reward/mean"]
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-4, abs=1e-6)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "step-0000003" / "dcp").is_dir()
    from bridgerl.models import load_causal_lm
    load_causal_lm(str(tmp_path / "two" / "final"))  # an ordinary HF folder


def test_rollout_workers_2_trains_3_steps(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    run = _cli(["train", "examples/grpo.yaml", f"model.path={tiny_model_dir}", *SMALL, *SPREAD, "rollout.workers=2",
                "rewards.workers=1", "--out", str(tmp_path / "w")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    m = _metrics(tmp_path / "w")
    assert [r["step"] for r in m] == [1, 2, 3]
    assert all(r["workers/restarts"] == 0 for r in m)
    assert all(r["generator/version"] == r["step"] - 1 for r in m)  # weights pushed before each step
    assert m[0]["tokens/generated"] > 0 and not any(r.get("update/skipped") for r in m)
