"""Collapse alarms: each detector fires once per streak, re-arms, survives a checkpoint; rollback
restores the last checkpoint with a lower learning rate that the scheduler keeps."""
from __future__ import annotations

import math
import random

import pytest
import torch

from bridgerl.config import AlarmsConfig
from bridgerl.train.alarms import CollapseAlarm, clipped_share, respond, rollback


def alarm(**kw) -> CollapseAlarm:
    base = dict(entropy_min=None, length_share=None, reward_std_min=None, reward_z=None)
    return CollapseAlarm(AlarmsConfig(**(base | kw)), max_new_tokens=16)


def fired(a: CollapseAlarm, stream: list[dict]) -> list[int]:
    """The steps (0-based) at which any warning fired."""
    return [t for t, m in enumerate(stream) if a.update(m)]


def test_entropy_collapse_fires_after_k_steps_once_per_streak():
    a = alarm(entropy_min=0.1, entropy_steps=3)
    ent = [1.0, 0.05, 0.05, 0.05, 0.05, 0.5, 0.01, 0.01, 0.01]
    assert fired(a, [{"entropy": e} for e in ent]) == [3, 8]
    assert a.flags() == {"alarm/entropy_collapse": 1.0}


def test_length_detector_reads_the_clipped_share():
    a = alarm(length_share=0.5, length_steps=2)
    shares = [0.2, 0.9, 0.9, 0.9, 0.1, 0.6, 0.7]
    assert fired(a, [{"completion/clipped_share": s} for s in shares]) == [2, 6]
    assert fired(alarm(length_share=0.5), [{"entropy": 1.0}] * 10) == []  # metric absent: off


def test_clipped_share_counts_samples_cut_without_eos():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    eos = torch.tensor([False, True, True])  # the third ended with EOS at the last position
    assert clipped_share(mask, eos, max_new_tokens=4) == pytest.approx(1 / 3)


def test_reward_collapse_and_explosion():
    a = alarm(reward_std_min=1e-6, reward_steps=3)
    assert fired(a, [{"reward/std": s} for s in [0.3, 0.0, 0.0, 0.0, 0.0]]) == [3]

    rng = random.Random(0)
    steady = [{"reward/mean": 0.5 + rng.uniform(-0.05, 0.05)} for _ in range(20)]
    a = alarm(reward_z=8.0, reward_warmup=10)
    assert fired(a, steady) == []
    baseline = a.reward.mean
    warnings = a.update({"reward/mean": 40.0})
    assert len(warnings) == 1 and warnings[0].startswith("reward explosion")
    assert a.reward.mean == baseline  # the outlier is not folded into the baseline
    assert a.update({"reward/mean": 0.5}) == []  # back to normal: re-armed
    assert a.update({"reward/mean": math.nan})  # a NaN mean reward is an explosion at once
    assert alarm(reward_abs_max=10.0).update({"reward/mean": -11.0})


def test_state_dict_continues_the_same_streaks():
    stream = [{"entropy": 0.01, "reward/mean": 0.5 + 0.01 * t} for t in range(12)]
    whole = alarm(entropy_min=0.1, entropy_steps=5, reward_z=3.0, reward_warmup=3)
    expected = [whole.update(m) for m in stream]
    first = alarm(entropy_min=0.1, entropy_steps=5, reward_z=3.0, reward_warmup=3)
    got = [first.update(m) for m in stream[:3]]
    import json
    second = alarm(entropy_min=0.1, entropy_steps=5, reward_z=3.0, reward_warmup=3)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain JSON, checkpoint-safe
    got += [second.update(m) for m in stream[3:]]
    assert got == expected and any(expected)


@pytest.fixture
def run(tmp_path, tiny_model_dir):
    from bridgerl.config import load_config
    from bridgerl.train.run import build_run

    reward = tmp_path / "length.py"  # graded: every step has pairs, so the weights move
    reward.write_text("def score(completions, **_):\n    return [float(len(c)) for c in completions]\n")
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "rewards.tasks.arithmetic.kind=python",
                             f"rewards.tasks.arithmetic.function={reward}:score", "rollout.temperature=1.5",
                             "data.num_train=8", "data.prompts_per_step=2",
                             "rollout.n=2", "rollout.max_new_tokens=4", "train.micro_batch=4", "optim.lr=1e-3",
                             "log.tensorboard=false", "log.progress=false", f"train.out_dir={tmp_path / 'r'}",
                             "rewards.processes=0", "train.checkpoint_every=2", "train.on_collapse=rollback"])
    return build_run(cfg)


def test_rollback_restores_the_checkpoint_and_lowers_the_lr(run):
    from bridgerl.train.checkpoint import save_checkpoint
    from bridgerl.train.checkpoint import run_state as state_dict
    from bridgerl.train.loop import train_step

    with pytest.raises(RuntimeError, match="no checkpoint"):
        rollback(run, 0.5)
    for _ in range(2):
        train_step(run)
    save_checkpoint(run.out_dir, run.step, state_dict(run))
    saved = {k: v.clone() for k, v in run.policy.state_dict().items()}
    train_step(run)
    assert not all(torch.equal(saved[k], v) for k, v in run.policy.state_dict().items())

    a = CollapseAlarm(run.cfg.train.alarms, run.cfg.rollout.max_new_tokens)
    lines = []
    assert respond(run, a, ["entropy collapse: test"], "rollback", lr_factor=0.5, max_rollbacks=1,
                   log=lines.append) is False
    assert run.step == 2 and a.rollbacks == 1 and "rolled back to step-0000002" in lines[-1]
    assert all(torch.equal(saved[k], v) for k, v in run.policy.state_dict().items())
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    train_step(run)  # the scheduler keeps the lower rate
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    # Rollbacks spent: the next alarm stops the run; `stop` stops at once; `warn` goes on.
    assert respond(run, a, ["again"], "rollback", max_rollbacks=1, log=lines.append) is True
    assert respond(run, a, ["x"], "stop", log=lines.append) is True
    assert respond(run, a, ["x"], "warn", log=lines.append) is False
    assert respond(run, a, [], "stop", log=lines.append) is False
