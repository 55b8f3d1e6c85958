"""Loss variants and mismatch correction inside the real loop, on the tiny model: every variant
trains, the generator's recorded log-probs match the trainer's (so mismatch/* is small and logged),
and a correction weight that masks everything leaves the policy untouched."""
import math

import pytest
import torch

from bridgerl.algos.policy_loss import LOSSES
from bridgerl.config import load_config
from bridgerl.train.loop import train_step
from bridgerl.train.run import build_run

from test_train import BASE, write_config


def run_for(tmp_path, model_dir, *extra):
    reward = tmp_path / "length.py"  # graded by length: groups have a spread, so every step trains
    reward.write_text("def score(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")
    cfg = load_config(write_config(tmp_path, model_dir), BASE + [
        "rewards.tasks.arithmetic.kind=python", f"rewards.tasks.arithmetic.function={reward}:score", "algo.name=grpo", "algo.beta=0", "algo.updates_per_batch=2", "rollout.temperature=1.5",
        f"train.out_dir={tmp_path / 'run'}", *extra])
    return build_run(cfg)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_variant_trains_in_the_loop_and_logs_the_mismatch(tmp_path, tiny_model_dir, loss):
    run = run_for(tmp_path, tiny_model_dir, f"algo.loss={loss}", "algo.rollout_correction=token_tis")
    before = [p.detach().clone() for p in run.policy.parameters()]
    trained = False
    for _ in range(3):
        m = train_step(run)
        assert math.isfinite(m["loss"])
        if m.get("tokens/trained"):
            trained = True
            # The generator records log-probs at temperature 1 whatever it samples at, from the same
            # weights: its numbers and the trainer's differ only by float noise.
            assert 0 <= m["mismatch/kl"] < 1e-4 and m["mismatch/max"] < 1e-2
            assert 0.99 < m["correction/ratio/mean"] < 1.01 and m["correction/truncated_frac"] == 0.0
    assert trained, "no group with a reward spread in 3 steps: the test saw no update"
    assert m["ratio/mean"] != 1.0 or loss == "gspo"  # the second pass is off-policy (GSPO: a sequence ratio near 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.policy.parameters()))


def test_sequence_mask_that_drops_every_sequence_leaves_no_policy_gradient(tmp_path, tiny_model_dir):
    """seq_mask with a band no real sequence fits cannot be set through the config (C > 1), so the
    objective's weights are forced here, after its first pass fixed them."""
    from bridgerl.algos.objective import BatchContext
    from bridgerl.train.loop import Timer, sample_batch

    run = run_for(tmp_path, tiny_model_dir, "algo.rollout_correction=seq_mask", "algo.correction_threshold=1.5")
    cfg = run.cfg
    rows = run.stream.next_batch()
    rollouts, _, _ = sample_batch(run, rows, Timer())
    rewards = (torch.arange(len(rows) * cfg.rollout.n, dtype=torch.float32) % 2).view(len(rows), -1)
    batch = run.objective.make_batch(rollouts, rewards, BatchContext(
        binary=torch.ones(len(rows), dtype=torch.bool), reference=None, policy_version=run.step,
        micro_batch=cfg.train.micro_batch, max_new_tokens=cfg.rollout.max_new_tokens))
    for micro in batch.micro:
        loss, m = run.objective.loss(run.train_policy, micro)
        assert m["correction/masked_frac"] == 0.0  # same weights sampled: every sequence inside [1/C, C]
        micro.weights = torch.zeros_like(micro.weights)
        run.train_policy.zero_grad()
        loss, _ = run.objective.loss(run.train_policy, micro)
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in run.train_policy.parameters())


def half_flat_reward(tmp_path):
    """Graded by length for prompts of odd length, 0 for the rest: about half the groups carry no signal."""
    reward = tmp_path / "half.py"
    reward.write_text("def score(prompts, completions, **_):\n"
                      "    return [float(len(c)) if len(str(p)) % 2 else 0.0 for p, c in zip(prompts, completions)]\n")
    return [f"rewards.tasks.arithmetic.kind=python", f"rewards.tasks.arithmetic.function={reward}:score"]


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tmp_path, tiny_model_dir):
    base = BASE + half_flat_reward(tmp_path) + ["algo.name=grpo", "algo.beta=0", "data.num_train=64"]
    plain = build_run(load_config(write_config(tmp_path, tiny_model_dir), base + [f"train.out_dir={tmp_path / 'a'}"]))
    off = [train_step(plain) for _ in range(3)]
    assert sum(m["groups/skipped"] for m in off) > 0  # without it, flat groups are skipped
    run = build_run(load_config(write_config(tmp_path, tiny_model_dir), base + [
        "rollout.dynamic_sampling.max_rounds=6", f"train.out_dir={tmp_path / 'b'}"]))
    for _ in range(3):
        m = train_step(run)
        assert m["sampling/groups_kept"] == 4 and m["groups/skipped"] == 0  # prompts_per_step informative groups
        assert m["sampling/rounds"] >= 1 and m["sampling/groups_sampled"] >= 4
        # the ledger: every round's tokens are generated, only the kept groups' are trained
        assert m["tokens/generated_all_rounds"] == m["tokens/generated"]
        assert m["tokens/trained"] == m["tokens/generated"] - m["tokens/unused"]


def test_bounded_staleness_drops_and_counts_old_groups(tmp_path, tiny_model_dir):
    from bridgerl.train.loop import Timer, sample_batch
    from bridgerl.train.selection import select_samples

    run = build_run(load_config(write_config(tmp_path, tiny_model_dir), BASE + [
        "algo.name=grpo", "rollout.sync_every=2", "rollout.max_staleness=1", f"train.out_dir={tmp_path / 's'}"]))
    steps = [train_step(run) for _ in range(4)]
    assert all(m["staleness/dropped"] == 0 for m in steps)  # s = 2 ≤ k + 1: nothing is ever too old in-process
    # Samples from overlapping workers can be older: versions 4, 3, 1, 0 against policy step 4.
    rows = run.stream.next_batch()
    rollouts, rewards, sampled = sample_batch(run, rows, Timer())
    rollouts.versions = torch.tensor([4, 3, 1, 0]).repeat_interleave(run.cfg.rollout.n)
    (kept_rows, kept, kept_rewards), m = select_samples(run, (rows, rollouts, rewards), sampled, Timer(), sample_batch)
    assert [r["id"] for r in kept_rows] == [r["id"] for r in rows[:2]] and kept_rewards.shape == (2, run.cfg.rollout.n)
    assert kept.versions.tolist() == [4] * 4 + [3] * 4 and m["staleness/dropped"] == 8
    rollouts.versions = torch.zeros_like(rollouts.versions)
    with pytest.raises(RuntimeError, match="rollout.max_staleness"):
        select_samples(run, (rows, rollouts, rewards), sampled, Timer(), sample_batch)
