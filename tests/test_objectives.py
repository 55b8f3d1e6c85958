"""§6 invariants of the DPO and GRPO objectives (pure tensor functions)."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgerl.algos.dpo import build_pairs, dpo_loss
from bridgerl.algos.group_dpo import group_dpo_loss
from bridgerl.algos.grpo import group_advantages, grpo_loss, k3_kl

rewards_strategy = st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=8), min_size=1, max_size=6)


def test_dpo_loss_is_log2_per_pair_when_policy_equals_reference():
    lp = torch.randn(5)
    lr = torch.randn(5)
    loss, m = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1, reduction="sum")
    assert math.isclose(loss.item(), 5 * math.log(2), rel_tol=1e-6)
    loss_mean, _ = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1)
    assert math.isclose(loss_mean.item(), math.log(2), rel_tol=1e-6)


def test_dpo_loss_decreases_when_chosen_gains():
    ref_c, ref_r = torch.zeros(3), torch.zeros(3)
    base, _ = dpo_loss(torch.zeros(3), torch.zeros(3), ref_c, ref_r, beta=0.1)
    better, m = dpo_loss(torch.ones(3), torch.zeros(3), ref_c, ref_r, beta=0.1)
    assert better < base and m["dpo/accuracy"] == 1.0


def test_empty_dpo_batch_gives_zero_loss_and_zero_gradient():
    w = torch.zeros(0, requires_grad=True)
    loss, m = dpo_loss(w, w, w.detach(), w.detach(), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and m["dpo/pairs"] == 0


def test_pairs_math_random_correct_vs_incorrect():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]] * 200)
    valid, c, r = build_pairs(rewards, torch.ones(200, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert valid.all()
    assert (rewards.gather(1, c[:, None]) == 1).all() and (rewards.gather(1, r[:, None]) == 0).all()
    # Random among the correct ones: every correct index gets picked.
    assert set(c.tolist()) == {0, 2, 5} and set(r.tolist()) == {1, 3, 4}


@given(rewards_strategy)
@settings(max_examples=60, deadline=None)
def test_pairs_best_vs_worst_and_equal_groups_skipped(rows):
    width = min(len(r) for r in rows)
    rewards = torch.tensor([r[:width] for r in rows])
    valid, c, r = build_pairs(rewards, torch.zeros(len(rows), dtype=torch.bool))
    for g in range(len(rows)):
        if rewards[g].max() == rewards[g].min():
            assert not valid[g]
        else:
            assert valid[g]
            assert rewards[g, c[g]] == rewards[g].max() and rewards[g, r[g]] == rewards[g].min()


@given(rewards_strategy)
@settings(max_examples=60, deadline=None)
def test_grpo_advantages_sum_to_zero_and_vanish_on_equal_groups(rows):
    width = min(len(r) for r in rows)
    rewards = torch.tensor([r[:width] for r in rows], dtype=torch.float64)
    adv = group_advantages(rewards)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-6)
    equal = rewards.max(dim=1).values == rewards.min(dim=1).values
    assert (adv[equal] == 0).all()


def test_grpo_advantage_matches_worked_example():
    # algorithms.md §3.5: r = [0.1, 0.4, 0.5, 0.9] → advantages before shaping.
    adv = group_advantages(torch.tensor([[0.1, 0.4, 0.5, 0.9]], dtype=torch.float64))
    assert torch.allclose(adv, torch.tensor([[-1.1350, -0.2270, 0.0757, 1.2863]], dtype=torch.float64), atol=1e-4)


@given(st.lists(st.floats(-20, 0), min_size=1, max_size=30), st.lists(st.floats(-20, 0), min_size=1, max_size=30))
@settings(max_examples=80, deadline=None)
def test_k3_kl_nonnegative_and_zero_iff_equal(a, b):
    k = min(len(a), len(b))
    lp, ref = torch.tensor(a[:k], dtype=torch.float64), torch.tensor(b[:k], dtype=torch.float64)
    kl = k3_kl(lp, ref)
    assert (kl >= -1e-12).all()
    assert torch.allclose(k3_kl(lp, lp), torch.zeros(k, dtype=torch.float64))


def test_grpo_on_policy_gradient_is_advantage_times_score():
    logits = torch.randn(4, 6, requires_grad=True)
    logps = logits.log_softmax(-1)[:, :3]  # three "tokens" per sequence
    mask = torch.ones(4, 3)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, m = grpo_loss(logps, logps.detach(), adv, mask, aggregation="sum", n=4)
    loss.backward()
    g1 = logits.grad.clone()
    logits.grad = None
    manual = -(adv[:, None] * logits.log_softmax(-1)[:, :3]).sum() / 4
    manual.backward()
    assert torch.allclose(g1, logits.grad, atol=1e-6)
    assert m["ratio/mean"] == 1.0 and m["ratio/clipped_frac"] == 0.0


def test_grpo_clip_stops_gradient_beyond_the_trust_region():
    logps = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-1.0]])  # ratio e ≈ 2.7 > 1.2
    loss, m = grpo_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1), importance="clip", clip_eps=0.2)
    loss.backward()
    assert logps.grad.abs().item() == 0.0 and m["ratio/clipped_frac"] == 1.0
    logps.grad = None
    loss, _ = grpo_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1), importance="truncate", truncate_max=2.0)
    loss.backward()
    assert math.isclose(logps.grad.item(), -2.0, rel_tol=1e-6)


def test_grpo_aggregations_agree_on_equal_lengths_and_masks_padding():
    logps = torch.randn(4, 5)
    mask = torch.ones(4, 5)
    mask[0, 3:] = 0
    adv = torch.randn(4)
    full, _ = grpo_loss(logps, logps, adv, mask, aggregation="token_mean")
    manual = -(adv[:, None] * mask).sum() / mask.sum()
    assert torch.allclose(full, manual)
    logps2 = logps.clone()
    logps2[0, 3:] = 100.0  # padding must not matter
    again, _ = grpo_loss(logps2, logps2, adv, mask, aggregation="token_mean")
    assert torch.allclose(full, again)


def test_group_dpo_averages_all_better_worse_pairs():
    logps = torch.tensor([[1.0, 0.0, 0.0]])
    ref = torch.zeros(1, 3)
    rewards = torch.tensor([[1.0, 0.0, 0.0]])
    loss, m = group_dpo_loss(logps, ref, rewards, beta=1.0)
    expected = -torch.nn.functional.logsigmoid(torch.tensor(1.0))  # both pairs have margin 1
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6) and m["dpo/pairs"] == 2
    equal, m2 = group_dpo_loss(logps, ref, torch.ones(1, 3), beta=1.0)
    assert equal.item() == 0.0 and m2["dpo/pairs"] == 0


def test_micro_batch_metrics_reduce_max_keys_by_max():
    from bridgerl.algos.objective import mean_metrics

    out = mean_metrics([{"ratio/max": 1.5, "kl": 0.2}, {"ratio/max": 3.0, "kl": 0.4}, {"kl": 0.6}])
    assert out["ratio/max"] == 3.0 and abs(out["kl"] - 0.4) < 1e-12
