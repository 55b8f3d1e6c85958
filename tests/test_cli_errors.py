"""User mistakes at the command line: one line naming the file/row/key, exit code 2, no traceback
unless --debug. Run as a user runs it: a `bridgerl` subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def bridgerl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bridgerl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def config(tmp_path, tiny_model_dir) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{path: {tiny_model_dir}}}\nlog: {{progress: false, tensorboard: false}}\n")
    return path


CASES = {
    "missing model": (["model.path=/no/such/model"], "config key 'model.path' = '/no/such/model': no such folder"),
    "missing data": (["data.train=/no/such/rows.jsonl"], "/no/such/rows.jsonl: no such file or folder"),
    "malformed row": (["data.train={bad}", "data.default_task=arithmetic"],
                      "bad.jsonl, line 2: missing field 'prompt'"),
    "bad reward function": (["rewards.tasks.arithmetic.kind=python", "rewards.tasks.arithmetic.function={rf}:nope"],
                            "config key 'rewards.tasks.arithmetic.function'"),
    "bad config": (["rollout.sync_evry=2", "algo.beta=-1"],
                   "unknown config key 'rollout.sync_evry'; did you mean 'rollout.sync_every'?"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistakes_print_one_line_and_exit_2(tmp_path, config, case):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n{"answer": "3"}\n')
    (tmp_path / "rf.py").write_text("def score(completions, **_):\n    return [0.0] * len(completions)\n")
    overrides, expected = CASES[case]
    overrides = [o.format(bad=tmp_path / "bad.jsonl", rf=tmp_path / "rf.py") for o in overrides]
    line = one_line_error(bridgerl("train", str(config), *overrides, "--out", str(tmp_path / "run"), cwd=tmp_path))
    assert line.startswith("bridgerl train: error: ") and expected in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_debug_shows_the_traceback(tmp_path, config):
    result = bridgerl("train", str(config), "model.path=/no/such/model", "--debug", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr
