"""Train/infer mismatch metrics and correction (algos/correction.py); dynamic sampling and bounded
staleness bookkeeping (algos/sampling.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgerl.algos.correction import mismatch_metrics, rollout_correction
from bridgerl.algos.sampling import DynamicBatch, fresh_enough, informative_groups
from bridgerl.config import ConfigError, load_config


def test_mismatch_is_zero_when_generator_and_trainer_agree_and_ignores_padding():
    lp = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    mask[1, 2:] = 0
    gen = lp.clone()
    gen[1, 3] += 50.0  # on padding: must not count
    m = mismatch_metrics(lp, gen, mask)
    assert m == {"mismatch/kl": 0.0, "mismatch/k1": 0.0, "mismatch/max": 0.0}


@given(st.lists(st.floats(-3, 3), min_size=6, max_size=6), st.lists(st.floats(-3, 3), min_size=6, max_size=6))
@settings(max_examples=60, deadline=None)
def test_mismatch_metrics_match_their_formulas(a, b):
    train = torch.tensor(a, dtype=torch.float64).view(2, 3)
    gen = torch.tensor(b, dtype=torch.float64).view(2, 3)
    m = mismatch_metrics(train, gen, torch.ones(2, 3))
    log_r = train - gen  # r = π_train / π_gen on the generator's samples
    assert math.isclose(m["mismatch/kl"], (log_r.exp() - 1 - log_r).mean().item(), rel_tol=1e-5, abs_tol=1e-6)
    assert m["mismatch/kl"] >= 0
    assert math.isclose(m["mismatch/k1"], (gen - train).mean().item(), rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(m["mismatch/max"], (gen - train).abs().max().item(), rel_tol=1e-6, abs_tol=1e-6)


def test_token_tis_weights_are_truncated_detached_ratios():
    train = torch.zeros(1, 4, requires_grad=True)
    ratios = torch.tensor([[0.5, 1.0, 1.9, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, m = rollout_correction("token_tis", train, -ratios.log(), mask, threshold=1.8)
    assert not w.requires_grad
    assert torch.allclose(w, torch.tensor([[0.5, 1.0, 1.8, 0.0]]))
    assert math.isclose(m["correction/truncated_frac"], 1 / 3, rel_tol=1e-6)
    assert math.isclose(m["correction/ratio/max"], 1.9, rel_tol=1e-5)
    assert math.isclose(m["correction/ratio/min"], 0.5, rel_tol=1e-5)


def test_seq_mask_drops_sequences_whose_geometric_mean_ratio_leaves_the_band():
    # Sequence 0: token ratios 1.5 and 1/1.5 → geometric mean 1 (kept, though each token is far off).
    # Sequence 1: every token at 1.3 → geometric mean 1.3 > C = 1.2 (masked).
    # Sequence 2: every token at 0.8 → 0.8 < 1/1.2 (masked).
    ratios = torch.tensor([[1.5, 1 / 1.5], [1.3, 1.3], [0.8, 0.8]])
    mask = torch.ones(3, 2)
    w, m = rollout_correction("seq_mask", torch.zeros(3, 2), -ratios.log(), mask, threshold=1.2)
    assert torch.equal(w, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert math.isclose(m["correction/masked_frac"], 2 / 3, rel_tol=1e-6)
    # Length invariance: the same per-token drift over ten times the tokens gives the same decision
    # (a product ratio, 1.05^20 ≈ 2.65, would cross the threshold).
    short, _ = rollout_correction("seq_mask", torch.zeros(1, 2), -torch.full((1, 2), 1.05).log(), torch.ones(1, 2), 1.2)
    long, _ = rollout_correction("seq_mask", torch.zeros(1, 20), -torch.full((1, 20), 1.05).log(), torch.ones(1, 20), 1.2)
    assert short.all() and long.all()


def test_correction_none_is_the_mask_and_bad_settings_are_refused():
    mask = torch.tensor([[1, 1, 0]])
    w, m = rollout_correction("none", torch.zeros(1, 3), torch.randn(1, 3), mask, 2.0)
    assert torch.equal(w, mask.float()) and m == {}
    with pytest.raises(ValueError, match="rollout_correction"):
        rollout_correction("sequence", torch.zeros(1, 3), torch.zeros(1, 3), mask, 2.0)
    with pytest.raises(ValueError, match="exceed 1"):
        rollout_correction("token_tis", torch.zeros(1, 3), torch.zeros(1, 3), mask, 1.0)


def test_informative_groups_use_the_spread_with_a_tolerance():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.50, 0.52, 0.51], [0.2, 0.2, 0.2]])
    assert informative_groups(rewards).tolist() == [False, True, True, False]
    assert informative_groups(rewards, tol=0.05).tolist() == [False, True, False, False]


def test_fresh_enough_drops_and_counts_old_samples_and_keeps_groups_whole():
    versions = torch.tensor([10, 10, 7, 7, 9, 8])
    keep, m = fresh_enough(versions, policy_step=10, max_staleness=2)
    assert keep.tolist() == [True, True, False, False, True, True]
    assert m == {"staleness/max_sampled": 3.0, "staleness/dropped": 2.0}
    keep, m = fresh_enough(versions, policy_step=10, max_staleness=1, n=2)  # group 2 has a sample 2 old
    assert keep.tolist() == [True, True, False, False, False, False] and m["staleness/dropped"] == 4.0
    keep, m = fresh_enough(versions, policy_step=10, max_staleness=None)
    assert keep.all() and m["staleness/dropped"] == 0.0


def test_dynamic_batch_fills_to_the_target_and_keeps_the_token_ledger():
    filler = DynamicBatch(target=3, max_rounds=2)
    first = filler.add(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([10.0, 20.0, 30.0]))
    assert first.tolist() == [1] and filler.needs_more()
    second = filler.add(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([5.0, 6.0, 7.0]))
    assert second.tolist() == [0, 1] and not filler.needs_more()  # the third informative group overflows
    m = filler.metrics()
    assert m["sampling/rounds"] == 2 and m["sampling/groups_kept"] == 3 and m["sampling/groups_informative"] == 4
    assert m["tokens/generated_all_rounds"] == 78.0 and m["tokens/unused"] == 78.0 - (20 + 5 + 6)
    assert m["sampling/batch_full"] == 1.0


def test_dynamic_batch_stops_after_max_rounds_even_if_short():
    filler = DynamicBatch(target=2, max_rounds=1)
    flat = torch.ones(2, 4)
    filler.add(flat, torch.ones(2))
    assert filler.needs_more()
    filler.add(flat, torch.ones(2))
    assert not filler.needs_more() and filler.metrics()["sampling/batch_full"] == 0.0
    off = DynamicBatch(target=2, max_rounds=0)
    off.add(flat, torch.ones(2))
    assert not off.needs_more()  # max_rounds 0: today's behaviour, one round


def test_staleness_config_refuses_what_would_train_on_nothing():
    base = ["model.path=x"]
    assert load_config(None, base + ["rollout.max_staleness=3", "rollout.sync_every=4"]).rollout.max_staleness == 3
    with pytest.raises(ConfigError, match="offline"):
        load_config(None, base + ["rollout.max_staleness=3", "rollout.sync_every=0"])
    with pytest.raises(ConfigError, match="sync_every <= 2"):
        load_config(None, base + ["rollout.max_staleness=1", "rollout.sync_every=5"])
    with pytest.raises(ConfigError, match="max_rounds"):
        load_config(None, base + ["rollout.dynamic_sampling.max_rounds=-1"])


def test_fresh_batches_use_trainer_logps_as_old_and_log_the_gap_stale_ones_use_the_generators():
    from bridgerl.algos.correction import old_logps_and_weights

    train = torch.randn(2, 3, requires_grad=True)
    gen = train.detach() - 0.5  # the generator gives every token a lower log-prob: r = e^0.5 ≈ 1.65
    mask = torch.ones(2, 3)
    old, w, m = old_logps_and_weights(train, gen, mask, fresh=True, mode="token_tis", threshold=1.5)
    assert torch.equal(old, train.detach()) and not old.requires_grad
    assert torch.allclose(w, torch.full((2, 3), 1.5)) and m["correction/truncated_frac"] == 1.0
    assert math.isclose(m["mismatch/max"], 0.5, rel_tol=1e-5)
    old, w, m = old_logps_and_weights(train, gen, mask, fresh=True, mode="none", threshold=1.5)
    assert w is None and "mismatch/kl" in m
    old, w, m = old_logps_and_weights(train, gen, mask, fresh=False, mode="token_tis", threshold=1.5)
    assert old is gen and w is None and m == {}
