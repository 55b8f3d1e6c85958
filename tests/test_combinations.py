"""Every pair of the config's switches either is refused before any model loads, with a message
naming a key, or runs a training step on a tiny model. And LoRA with a synced reference trains."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from bridgerl.config import ConfigError, load_config

BASE = ["data.num_train=8", "data.num_eval=4", "data.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4",
        "train.micro_batch=4", "train.steps=2", "log.tensorboard=false", "log.progress=false", "rewards.processes=0",
        "eval.max_prompts=4", "eval.max_new_tokens=4"]

# name -> overrides. Each is one thing a user turns on; pairs are where combinations break.
SWITCHES = {
    "grpo": ["algo.name=grpo"],
    "offline": ["rollout.sync_every=0"],
    "semi_online": ["rollout.sync_every=2"],
    "ref_sync": ["reference.sync=with_generator"],
    "lora": ["model.lora={r: 2}"],
    "bf16": ["train.mixed_precision=bf16"],
    "optune": ["algo.exploration={rho: 0.5}"],
    "group_dpo": ["algo.group=true"],
    "grpovi": ["algo.name=grpo", "algo.reward_shaping=variance_increase"],
    "graded_reward": ["rewards.tasks.arithmetic.kind=partial"],
    "reward_pool": ["rewards.processes=1"],
    "no_fast_decode": ["rollout.fast_decode=false"],
    "efficacy": ["data.efficacy={scorer: loss, select: top_ratio, ratio: 0.5}"],
}
PAIRS = list(itertools.combinations(SWITCHES, 2))


def one_step(tmp_path, model_dir: str, overrides: list[str]):
    """None if the config is refused (with its message checked), else the metrics of one step."""
    from bridgerl.train.loop import train_step
    from bridgerl.train.run import build_run

    try:
        cfg = load_config(None, [f"model.path={model_dir}", f"train.out_dir={tmp_path / 'run'}", *BASE, *overrides])
    except ConfigError as err:
        message = str(err)
        assert "config key" in message or "algo." in message or "reference." in message, message
        return None
    run = build_run(cfg)
    metrics = train_step(run)
    assert math.isfinite(metrics["loss"]) or metrics.get("update/skipped") or metrics.get("groups/skipped"), metrics
    return metrics


@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_each_pair_of_switches_is_refused_or_runs(tmp_path, tiny_model_dir, a, b):
    torch.set_num_threads(1)
    one_step(tmp_path, tiny_model_dir, SWITCHES[a] + SWITCHES[b])


def test_lora_with_a_synced_reference_trains_and_the_reference_follows(tmp_path, tiny_model_dir):
    from bridgerl.train.loop import train_step
    from bridgerl.train.run import build_run

    reward = tmp_path / "length.py"  # graded by length: every step has pairs, so the adapter moves
    reward.write_text("def score(completions, **_):\n    return [float(len(c)) for c in completions]\n")
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"train.out_dir={tmp_path / 'run'}", *BASE,
                             "model.lora={r: 4}", "reference.sync=with_generator", "rollout.sync_every=1",
                             "rewards.tasks.arithmetic.kind=python", f"rewards.tasks.arithmetic.function={reward}:score",
                             "rollout.temperature=1.5", "optim.lr=1e-2"])
    run = build_run(cfg)
    adapter0 = {k: v.clone() for k, v in run.policy.state_dict().items() if "lora_B" in k}
    for _ in range(3):
        metrics = train_step(run)
        assert math.isfinite(metrics["loss"])
        # Synced at the start of the step: the reference holds what the generator holds.
        gen, ref = run.generator.model.state_dict(), run.reference.state_dict()
        assert all(torch.equal(gen[k], ref[k]) for k in ref)
    moved = [k for k, v in run.policy.state_dict().items() if "lora_B" in k and not torch.equal(v, adapter0[k])]
    assert moved  # the adapter trained ...
    assert any(ref[k].abs().sum() > 0 for k in moved)  # ... and the reference follows it, not the bare base
