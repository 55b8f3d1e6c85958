"""A 5-step online GRPO run through the real CLI with rollout.engine=vllm, next to the same run with hf."""
import json
import os
import subprocess
import sys
from pathlib import Path

BASE = [
    "algo.name=grpo", "rollout.sync_every=1", "train.steps=5",
    "rollout.sync_check_every=1",  # hf's default probes every 10th push, vLLM's every push: same metric names
    "data.train=builtin:arithmetic", "data.num_train=24", "data.num_eval=8", "data.prompts_per_step=4",
    "rollout.n=4", "rollout.max_new_tokens=8", "eval.max_prompts=8", "eval.max_new_tokens=8",
    "train.micro_batch=8", "optim.lr=1e-3", "log.progress=false", "log.tensorboard=false",
    "rollout.vllm.max_model_len=256", "rollout.vllm.kv_cache_gb=1",
    # A graded reward a random tiny model already spreads, so groups have variance and steps update.
    "rewards.tasks.arithmetic.kind=python", "rewards.tasks.arithmetic.function=tests_vllm.test_train:digit_share",
]


def digit_share(prompts, completions, **columns) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def run_cli(tmp_path: Path, model_dir: str, engine: str) -> list[dict]:
    cfg = tmp_path / f"{engine}.yaml"
    cfg.write_text(f"model: {{path: {model_dir}}}\n")
    out = tmp_path / engine
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    # A process of its own: the run builds its own vLLM, apart from the tests' engine.
    proc = subprocess.run([sys.executable, "-m", "bridgerl.cli", "train", str(cfg), *BASE, f"rollout.engine={engine}",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(lines):
    return [m for m in lines if "reward/mean" in m]


def test_online_grpo_with_vllm_trains_and_logs_the_hf_metric_names(tmp_path, model_dir):
    hf, vl = run_cli(tmp_path, model_dir, "hf"), run_cli(tmp_path, model_dir, "vllm")
    hs, vs = steps(hf), steps(vl)
    assert [m["step"] for m in vs] == [1, 2, 3, 4, 5]
    # "entropy" aside: vLLM reports none (reports_entropy=False), so the loop does not log it and the
    # entropy-collapse alarm has nothing to watch.
    no_entropy = {"entropy", "alarm/entropy_collapse"}
    assert [set(m) - no_entropy for m in vs] == [set(m) - no_entropy for m in hs]
    assert {k for m in vl for k in m} - no_entropy == {k for m in hf for k in m} - no_entropy
    assert [m["generator/version"] for m in vs] == [0, 1, 2, 3, 4]  # a push at every step
    assert all(m["staleness/max"] == 0 for m in vs)
    for m in vs:
        assert m["loss"] == m["loss"] and m["tokens/generated"] > 0  # finite loss, real samples
    assert all(m["reward/group_std"] > 0 for m in vs)
    assert sum(m.get("update/skipped", 0) == 0 and m.get("grad_norm", 0) > 0 for m in vs) >= 4
    # The pushes were real: the policy moved, so the engine's samples change from step to step.
    assert len({round(m["reward/mean"], 6) for m in vs}) > 1
    evals = [m for m in vl if "eval/score" in m]
    assert evals[0]["step"] == 0 and evals[-1].get("final")
    assert (tmp_path / "vllm" / "final" / "config.json").exists()
