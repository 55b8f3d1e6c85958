"""OPTune invariants (algorithms.md §2, §6 "OPTune"): selection, merge, pool, wDPO."""
from __future__ import annotations

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bridgerl.algos.dpo import dpo_loss, dpo_losses
from bridgerl.algos.optune import (
    WEIGHT_SCHEMES,
    PairPool,
    merge_candidates,
    pair_weights,
    regeneration_count,
    regeneration_stats,
    select_for_regeneration,
    select_prompts,
    select_random,
    selection_keys,
)
from bridgerl.algos.optune import OPTuneObjective  # noqa: E402

FAST = settings(max_examples=40, deadline=None)
# Coarse reward grids make ties common, which is where tie-breaking bugs live.
rewards_lists = st.lists(st.integers(-3, 3).map(lambda v: v / 2), min_size=1, max_size=30)
rhos = st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 1 / 3, 0.9, 1.0]) | st.floats(0.0, 1.0)


def make_pool(r_chosen: list[float], gap: float = 1.0, version: int = 0, ids=None) -> PairPool:
    pool = PairPool()
    ids = ids if ids is not None else [f"p{i}" for i in range(len(r_chosen))]
    for pid, r in zip(ids, r_chosen):
        pool.update(pid, f"good {pid}", [1, 2, 3], r, r - gap, version, prompt=f"question {pid}")
    return pool


# --------------------------------------------------------------------------- selection


@FAST
@given(keys=rewards_lists, rho=rhos)
def test_selection_is_exactly_the_ceil_rho_lowest_with_stable_ties(keys, rho):
    ids = [f"q{i}" for i in range(len(keys))]
    picked = select_for_regeneration(dict(zip(ids, keys)), rho)
    k = regeneration_count(len(keys), rho)
    assert k - 1 < rho * len(keys) + 1e-9 and k >= rho * len(keys) - 1e-9  # k = ⌈ρ|P|⌉
    assert len(picked) == k
    assert len(set(picked)) == k
    # Reference: sort (key, position) pairs — an independent statement of "lowest key, then input order".
    expected = [ids[i] for _, i in sorted((keys[i], i) for i in range(len(keys)))][:k]
    assert picked == expected
    # Every unpicked key is >= every picked key.
    if 0 < k < len(keys):
        picked_set = set(picked)
        assert max(keys[ids.index(p)] for p in picked) <= min(keys[i] for i, q in enumerate(ids) if q not in picked_set)
    # Same answer from arrays (positions, or explicit ids) and from a tensor.
    assert select_for_regeneration(np.array(keys), rho) == [ids.index(p) for p in picked]
    assert select_for_regeneration(torch.tensor(keys), rho, prompt_ids=ids) == picked


def test_rho_one_selects_all_and_rho_zero_none():
    keys = {3: 0.5, "a": -1.0, 7: 0.5}
    assert sorted(map(str, select_for_regeneration(keys, 1.0))) == ["3", "7", "a"]
    assert select_for_regeneration(keys, 0.0) == []
    assert select_random(list(keys), 0.0, seed=1) == []
    assert set(select_random(list(keys), 1.0, seed=1)) == set(keys)


def test_count_uses_the_decimal_rho_not_its_binary_rounding():
    # 0.3 * 10 in floats is 3.0000000000000004; ⌈·⌉ of that would regenerate 4 prompts.
    assert regeneration_count(10, 0.3) == 3
    assert regeneration_count(100, 0.07) == 7
    assert regeneration_count(7, 0.5) == 4
    with pytest.raises(ValueError, match="rho"):
        regeneration_count(10, 1.5)


@FAST
@given(n=st.integers(0, 40), rho=rhos, seed=st.integers(0, 2**31))
def test_random_baseline_same_count_deterministic(n, rho, seed):
    ids = list(range(100, 100 + n))
    a = select_random(ids, rho, seed)
    assert a == select_random(ids, rho, seed)
    assert len(a) == len(set(a)) == regeneration_count(n, rho)
    assert set(a) <= set(ids)


def test_selection_keys_and_dispatch():
    pool = PairPool()
    pool.update(1, "a", "b", 0.9, 0.0, 0)   # high chosen, big gap
    pool.update(2, "a", "b", 0.2, 0.1, 0)   # low chosen, small gap
    pool.update(3, "a", "b", 0.5, 0.45, 0)  # mid chosen, smallest gap
    assert selection_keys(pool, "chosen_reward") == {1: 0.9, 2: 0.2, 3: 0.5}
    assert select_prompts(pool, 0.33, "chosen_reward") == [2]
    assert select_prompts(pool, 0.33, "reward_gap") == [3]
    assert len(select_prompts(pool, 0.34, "random", seed=0)) == 2  # ⌈1.02⌉
    with pytest.raises(ValueError, match="chosen_reward"):
        selection_keys(pool, "loss")


# ------------------------------------------------------------------------------- merge


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 6),
    p=st.integers(1, 8),
)
def test_merge_picks_argmax_argmin_of_pool_and_never_lowers_chosen(data, n, p):
    grid = st.integers(-4, 4).map(float)
    new = torch.tensor(data.draw(st.lists(st.lists(grid, min_size=n, max_size=n), min_size=p, max_size=p)))
    old_hi = torch.tensor(data.draw(st.lists(grid, min_size=p, max_size=p)))
    old = torch.stack([old_hi, old_hi - torch.tensor(data.draw(st.lists(st.integers(0, 3).map(float), min_size=p, max_size=p)))], 1)
    chosen, rejected = merge_candidates(new, old)
    pool = torch.cat([new, old], 1)
    rc, rr = pool.gather(1, chosen[:, None])[:, 0], pool.gather(1, rejected[:, None])[:, 0]
    assert torch.equal(rc, pool.max(1).values)
    assert torch.equal(rr, pool.min(1).values)
    assert (rc >= rr).all() and (chosen != rejected).all()
    assert (rc >= old[:, 0]).all()  # the old chosen is in the pool, so chosen reward never drops
    # Per-prompt calls agree with the vectorised one.
    for i in range(p):
        assert merge_candidates(new[i].tolist(), old[i].tolist()) == (int(chosen[i]), int(rejected[i]))


def test_merge_ties_prefer_new_samples_and_nan_means_absent():
    # New sample 1 ties the old chosen (index 3): the fresher sample wins.
    assert merge_candidates([0.0, 1.0, 0.5], [1.0, 0.0]) == (1, 0)
    # Without an old pair only new samples compete.
    assert merge_candidates([0.3, 0.9, 0.1]) == (1, 2)
    c, r = merge_candidates(torch.tensor([[0.2, 0.4], [0.2, 0.4]]), torch.tensor([[float("nan")] * 2, [1.0, 0.0]]))
    assert c.tolist() == [1, 2] and r.tolist() == [0, 3]
    # A single present member pairs with itself (gap 0) rather than with an absent one.
    assert merge_candidates([float("nan"), 0.7]) == (1, 1)
    with pytest.raises(ValueError, match="no rewards"):
        merge_candidates([float("nan")])


# -------------------------------------------------------------------------------- pool


def test_regeneration_round_leaves_untouched_pairs_identical():
    rng = np.random.default_rng(0)
    ids = list(range(20))
    pool = make_pool(list(rng.normal(size=20)), ids=ids)
    before = {e.prompt_id: e for e in pool}
    snapshot = json.dumps(pool.state_dict())
    picked = select_prompts(pool, 0.25, "chosen_reward")
    n = 4
    new_rewards = torch.tensor(rng.normal(size=(len(picked), n)))
    completions = [[f"v1 {pid} #{j}" for j in range(n)] for pid in picked]
    merged = pool.merge_many(picked, completions, new_rewards, version=1)
    assert [e.prompt_id for e in merged] == picked and len(pool) == 20
    for pid in ids:
        after = pool[pid]
        if pid not in picked:
            assert after is before[pid]
        else:
            assert after.r_chosen >= after.r_rejected
            assert after.r_chosen >= before[pid].r_chosen
            assert after.prompt == before[pid].prompt
            row = picked.index(pid)
            old_sides = {(json.dumps(before[pid].chosen), before[pid].r_chosen),
                         (json.dumps(before[pid].rejected), before[pid].r_rejected)}
            for side, r, v in [(after.chosen, after.r_chosen, after.version_chosen),
                               (after.rejected, after.r_rejected, after.version_rejected)]:
                # Each side is a new sample (version 1, its own reward) or carried over from the old pair.
                if v == 1:
                    assert r == new_rewards[row, completions[row].index(side)].item()
                else:
                    assert v == 0 and (json.dumps(side), r) in old_sides
    stats = regeneration_stats(len(pool), len(picked), n, generated_tokens=123, merged=merged, version=1)
    assert stats["optune/prompts_regenerated"] == 5 and stats["optune/generations"] == 5 * n
    assert stats["optune/generated_tokens"] == 123 and stats["optune/regenerated_fraction"] == 0.25
    # rho = 0: nothing selected, nothing merged, pool byte-identical.
    pool2 = PairPool()
    pool2.load_state_dict(json.loads(snapshot))
    pool2.merge_many(select_prompts(pool2, 0.0), [], torch.empty(0, n), version=2)
    assert json.dumps(pool2.state_dict()) == snapshot


def test_rho_one_regenerates_every_prompt():
    pool = make_pool([0.1, 0.2, 0.3])
    picked = select_prompts(pool, 1.0)
    pool.merge_many(picked, [["x", "y"]] * 3, torch.tensor([[5.0, -5.0]] * 3), version=3)
    assert all(e.version_chosen == 3 and e.version_rejected == 3 for e in pool)


def test_pool_state_dict_round_trip_json_and_torch():
    pool = PairPool()
    pool.update(0, "text a", "text b", 1.0, 0.0, 0, prompt={"messages": [{"role": "user", "content": "hi"}]})
    pool.update("0", torch.tensor([5, 6, 7]), np.array([8, 9]), 0.5, 0.5, (2, 1))
    pool.update(np.int64(12), {"text": "ok", "token_ids": [1, 2]}, {"text": "no", "token_ids": [3]}, 2.0, -1.0, 4)
    state = pool.state_dict()
    for restored_state in (json.loads(json.dumps(state)), _torch_round_trip(state)):
        other = PairPool()
        other.load_state_dict(restored_state)
        assert list(other) == list(pool)  # same entries, same order, int 0 and str "0" kept apart
        assert other.prompt_ids() == [0, "0", 12]
    assert pool["0"].chosen == [5, 6, 7] and pool["0"].version_chosen == 2
    # A zero-gap pair is stored (the prompt stays selectable); DPO pairing skips it (see below).
    assert [e.gap > 0 for e in pool] == [True, False, True]


def _torch_round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_pool_rejects_bad_input():
    pool = PairPool()
    with pytest.raises(ValueError, match="swap chosen and rejected"):
        pool.update(1, "a", "b", 0.0, 1.0, 0)
    with pytest.raises(TypeError, match="int or str"):
        pool.update(1.5, "a", "b", 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="token ids"):
        pool.update(1, torch.tensor([0.5]), "b", 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="format"):
        pool.load_state_dict({"format": 99, "entries": []})


def test_pool_stats_staleness():
    pool = make_pool([1.0, 2.0], version=3)
    pool.update("p0", "a", "b", 1.5, 1.5, (5, 3))
    s = pool.stats(current_version=6)
    assert s["optune/pool_size"] == 2 and s["optune/pool_pairs"] == 1
    assert s["optune/pool_staleness_max"] == 3 and s["optune/pool_staleness_mean"] == pytest.approx((1 + 3 + 3 + 3) / 4)


# -------------------------------------------------------------------------------- wDPO

gaps_lists = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=40)


@FAST
@given(gaps=gaps_lists, beta2=st.floats(0.0, 8.0), scheme=st.sampled_from(WEIGHT_SCHEMES),
       normalize=st.sampled_from(["zscore", "mean", "none"]))
def test_weights_positive_mean_one_monotone(gaps, beta2, scheme, normalize):
    g = torch.tensor(gaps, dtype=torch.float64)
    w = pair_weights(g, beta2=beta2, scheme=scheme, normalize=normalize)
    assert w.shape == g.shape and not w.requires_grad
    assert (w > 0).all()
    assert w.mean().item() == pytest.approx(1.0, rel=1e-9)
    order = torch.argsort(g, stable=True)
    assert (w[order].diff() >= -1e-12).all()  # non-decreasing in the gap
    assert (w[g == g.max()] == w.max()).all()


@FAST
@given(gaps=gaps_lists, scheme=st.sampled_from(WEIGHT_SCHEMES))
def test_weights_give_ones_for_beta2_zero_equal_gaps_and_single_pair(gaps, scheme):
    assert torch.equal(pair_weights(gaps, beta2=0.0, scheme=scheme), torch.ones(len(gaps)))
    assert torch.equal(pair_weights([gaps[0]] * len(gaps), beta2=3.0, scheme=scheme), torch.ones(len(gaps)))
    assert torch.equal(pair_weights(gaps[:1], beta2=3.0, scheme=scheme), torch.ones(1))
    # Equal up to float rounding (differences of rewards) still counts as equal.
    nearly = torch.tensor([0.3 - 0.2, 0.1, 0.7 - 0.6], dtype=torch.float64)
    assert torch.equal(pair_weights(nearly, beta2=3.0, scheme=scheme), torch.ones(3, dtype=torch.float64))


def test_softmax_weights_match_the_spec_formula():
    g = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    z = (g - g.mean()) / g.std(unbiased=False)
    torch.testing.assert_close(pair_weights(g, beta2=0.7), 4 * torch.softmax(0.7 * z, 0))
    lin = pair_weights(g, beta2=2.0, scheme="linear", normalize="mean")
    expected = 1 + 2.0 * g / g.mean()
    torch.testing.assert_close(lin, expected / expected.mean())


def test_weights_reject_bad_input():
    with pytest.raises(ValueError, match="softmax"):
        pair_weights([1.0, 2.0], scheme="cubic")
    with pytest.raises(ValueError, match="beta2"):
        pair_weights([1.0, 2.0], beta2=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        pair_weights([1.0, -2.0])
    assert pair_weights(torch.empty(0)).numel() == 0


def _logps(b: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, generator=gen, dtype=torch.float64) * 5).requires_grad_() for _ in range(4)]


@FAST
@given(b=st.integers(1, 16), seed=st.integers(0, 1000), scheme=st.sampled_from(WEIGHT_SCHEMES))
def test_wdpo_with_beta2_zero_or_equal_gaps_is_plain_dpo(b, seed, scheme):
    lp = _logps(b, seed)
    plain, plain_m = dpo_loss(*lp, beta=0.1)
    gaps = torch.rand(b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for g, beta2 in [(gaps, 0.0), (torch.full((b,), 0.4, dtype=torch.float64), 2.0)]:
        w = pair_weights(g, beta2=beta2, scheme=scheme)
        loss, m = dpo_loss(*lp, beta=0.1, weights=w)
        torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)
        assert w.mean().item() == 1.0 and w.max().item() == 1.0
        assert m["dpo/margin"] == pytest.approx(plain_m["dpo/margin"])


def test_wdpo_gradients_flow_through_logps_not_weights():
    b = 6
    lp = _logps(b, 7)
    gaps = torch.tensor([0.1, 0.5, 0.2, 3.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    w = pair_weights(gaps, beta2=1.0)
    loss, _ = dpo_loss(*lp, beta=0.1, weights=w)
    loss.backward()
    assert gaps.grad is None
    # d loss / d chosen_i = w_i / B · d ℓ_i / d chosen_i, with ℓ_i the unweighted per-pair DPO loss.
    lp2 = [t.detach().clone().requires_grad_() for t in lp]
    per_pair, _ = dpo_losses(*lp2, beta=0.1)
    per_pair.sum().backward()
    for t, t2 in zip(lp, lp2):
        torch.testing.assert_close(t.grad, w.detach() * t2.grad / b)
    # The weights move the loss toward the big-gap pairs, so it differs from plain DPO.
    assert not torch.isclose(loss, dpo_loss(*lp, beta=0.1)[0])


def test_optune_objective_weights_each_pair_by_its_gap_across_micro_batches():
    """The loop's path: stored pairs as groups of 2; weights are computed over the whole batch (a softmax
    over gaps), not per micro-batch, and a zero-gap pair is skipped."""
    from bridgerl.algos.objective import BatchContext
    from bridgerl.config import DPOConfig
    from bridgerl.rollout.types import rollouts_from_tokens

    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5], [3.0, 0.0], [2.0, 1.5], [1.0, -1.0]])
    G = len(rewards)
    pairs = rollouts_from_tokens([[5, 6]] * (2 * G), [[7, 8, 9], [7, 9]] * G, [0] * (2 * G), pad_id=0, n=2)
    cfg = DPOConfig(optune={"rho": 0.5})
    ctx = BatchContext(binary=torch.zeros(G, dtype=torch.bool), reference=lambda rows: torch.zeros(len(rows), 3),
                       policy_version=0, micro_batch=2)  # one pair per micro-batch
    batch = OPTuneObjective(cfg).make_batch(pairs, rewards, ctx)
    assert batch.metrics["groups/skipped"] == 1 and len(batch.micro) == 4
    gaps = torch.cat([m.gaps for m in batch.micro])
    torch.testing.assert_close(gaps, torch.tensor([1.0, 3.0, 0.5, 2.0]))
    weights = torch.cat([m.weights for m in batch.micro])
    torch.testing.assert_close(weights, pair_weights(gaps.double(), 1.0).float())
    assert weights.mean().item() == pytest.approx(1.0) and weights[1] > weights[3] > weights[0] > weights[2]


def test_wdpo_empty_batch():
    empty = [torch.zeros(0, requires_grad=True) for _ in range(4)]
    loss, _ = dpo_loss(*empty, beta=0.1, weights=pair_weights(torch.zeros(0)))
    loss.backward()
    assert loss.item() == 0.0