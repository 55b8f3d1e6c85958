"""Faults a run must survive (docs/reliability.md has the table):

- kill -9 during generation, the update, a checkpoint write, and at a random moment; each time
  `--resume` continues, and the finished run's metrics equal an uninterrupted run's;
- a full disk while writing a checkpoint: one-line error, the previous checkpoint intact, resume;
- reward functions that return the wrong length, NaN, or raise: counted, and the run goes on.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bridgerl.cli import main

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
COMMON = ["data.train=builtin:arithmetic", "data.num_train=16", "data.num_eval=4", "data.prompts_per_step=2",
          "rollout.n=2", "rollout.max_new_tokens=6", "rollout.sync_every=2", "eval.at_start=false",
          "eval.max_prompts=4", "eval.max_new_tokens=4", "train.micro_batch=4", "optim.lr=1e-3", "train.steps=4",
          "train.checkpoint_every=1", "train.keep_checkpoints=2", "log.progress=false", "log.tensorboard=false",
          "rewards.processes=1"]


def write_config(tmp_path: Path, model_dir: str) -> Path:
    """A graded (length) reward, so every step has pairs and the optimizer steps."""
    reward = tmp_path / "length.py"
    reward.write_text("def score(completions, **_):\n    return [float(len(c)) for c in completions]\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {model_dir}}}\nrollout: {{temperature: 1.5}}\n"
                      f"rewards: {{tasks: {{arithmetic: {{kind: python, function: '{reward}:score'}}}}}}\n")
    return config


def steps(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens/s"))} for m in lines if "reward/mean" in m]


def worker_pids(tag: str) -> list[int]:
    """Reward worker processes started by a run tagged `tag` (they inherit its environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def no_orphans(tag: str) -> bool:
    deadline = time.monotonic() + 10
    while worker_pids(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not worker_pids(tag)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find orphaned workers")
def test_kill_9_anywhere_then_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["train", str(config), *COMMON, "--out", str(tmp_path / "clean")]) == 0

    out, tag = tmp_path / "killed", f"BRIDGERL_FAULT_TEST={uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", BRIDGERL_FAULT_TEST=tag.split("=")[1])

    def train(phase: str, at: int, resume: bool) -> subprocess.Popen:
        args = ["train", str(config), *COMMON, "--out", str(out)] + (["--resume"] if resume else [])
        return subprocess.Popen([sys.executable, str(TESTS / "fault_runner.py"), phase, str(at), *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Kill in each phase in turn, resuming each time; the n counts calls within one process.
    for k, (phase, at) in enumerate([("generation", 2), ("update", 2), ("checkpoint", 2)]):
        proc = train(phase, at, resume=k > 0)
        log, _ = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"{phase}: {log[-2000:]}"
        assert no_orphans(tag), "reward workers outlived the killed trainer"
        assert not list((out / "checkpoints").glob(".tmp-*")) or phase == "checkpoint"
    # Then at a random moment, from outside.
    proc = train("none", 0, resume=True)
    time.sleep(random.Random(0).uniform(2.0, 5.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert no_orphans(tag)
    proc = train("none", 0, resume=True)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, log[-3000:]
    assert steps(out) == steps(tmp_path / "clean")
    assert any(m.get("grad_norm", 0) > 0 for m in steps(out))  # the updates were real


def test_full_disk_during_a_checkpoint_then_resume(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import errno

    import bridgerl.train.checkpoint as ckpt

    config = write_config(tmp_path, tiny_model_dir)
    common = COMMON + ["train.steps=4", "rewards.processes=0"]
    real_write = ckpt._write

    def full_at_step_3(path, data):
        if "step-0000003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write", full_at_step_3)
    assert main(["train", str(config), *common, "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk" in err[0] and "step-0000002 is intact" in err[0], err
    assert ckpt.latest_checkpoint(tmp_path / "full").name == "step-0000002"
    monkeypatch.setattr(ckpt, "_write", real_write)
    assert main(["train", str(config), *common, "--out", str(tmp_path / "full"), "--resume"]) == 0
    assert main(["train", str(config), *common, "--out", str(tmp_path / "clean")]) == 0
    assert steps(tmp_path / "full") == steps(tmp_path / "clean")


def test_broken_reward_functions_are_counted_and_the_run_goes_on(tmp_path, tiny_model_dir):
    rewards = tmp_path / "broken.py"
    rewards.write_text("import math\n"
                       "def short(completions, **_):\n    return [1.0]\n"
                       "def nan(completions, **_):\n    return [math.nan] * len(completions)\n"
                       "def raises(completions, **_):\n    raise ValueError('broken')\n")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "task": t}) + "\n"
                            for i, t in enumerate(["short", "nan", "raises"] * 2)))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tiny_model_dir}}}\nrewards:\n  failure_score: -1\n  tasks:\n" + "".join(
        f"    {t}: {{kind: python, function: '{rewards}:{t}'}}\n" for t in ("short", "nan", "raises")))
    out = tmp_path / "run"
    args = [*COMMON, f"data.train={data}", "data.prompts_per_step=3", "train.steps=2", "train.checkpoint_every=0"]
    assert main(["train", str(config), *args, "--out", str(out)]) == 0
    lines = steps(out)
    assert len(lines) == 2
    for m in lines:  # 3 prompts × 2 samples, one task each: every sample failed, by its own kind
        assert m["reward/failures"] == 6 and m["reward/mean"] == -1
        fails = [m["reward/failures/length"], m["reward/failures/nan"], m["reward/failures/exception"]]
        assert sum(fails) == 6 and all(f in (0, 2, 4, 6) for f in fails)
