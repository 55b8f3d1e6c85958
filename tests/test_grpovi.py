"""GRPOVI invariants (algorithms.md §3 and §6) against the O(n²) vertex enumeration."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgerl.algos.grpovi import (
    increase_variance,
    increase_variance_groups,
    probs_from_logps,
    variance_increase_metrics,
    weighted_variance,
)

from grpovi_reference import enumerate_optimum, one_pass_walk  # noqa: E402  (tests/ is on sys.path)

FAST = settings(max_examples=150, deadline=None)


def f_value(z, p) -> float:
    """The objective Σ p z² with p normalised."""
    z, p = np.asarray(z, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return float((p / p.sum()) @ (z * z))


@st.composite
def groups(draw, max_n: int = 12):
    """(rewards, probs, low, high): 3-decimal rewards (often tied), 3-decimal probs (sometimes 0)."""
    n = draw(st.integers(1, max_n))
    pool = draw(st.lists(st.integers(-2000, 2000), min_size=1, max_size=n))
    r = np.array(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)), dtype=np.float64) / 1000
    p = np.array(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)), dtype=np.float64) / 1000
    if p.sum() == 0:
        p[draw(st.integers(0, n - 1))] = 1.0
    if draw(st.booleans()):
        return r, p, None, None
    low = float(r.min()) - draw(st.integers(0, 1000)) / 1000
    high = float(r.max()) + draw(st.integers(0, 1000)) / 1000
    return r, p, low, high


def bounds_of(r, low, high):
    return (r.min() if low is None else low), (r.max() if high is None else high)


# ------------------------------------------------------------ optimum vs enumeration
@FAST
@given(groups())
def test_same_optimum_as_enumeration_and_walk(case):
    r, p, low, high = case
    z = increase_variance(r, p, low, high)
    best = enumerate_optimum(r, p, low, high)
    walk = one_pass_walk(r, p, low, high)
    assert f_value(z, p) == pytest.approx(f_value(best, p), abs=1e-9)
    assert f_value(walk, p) == pytest.approx(f_value(best, p), abs=1e-9)
    if np.all(p > 0):  # with every weight positive the optimal z is unique
        np.testing.assert_allclose(z, best, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_large_group_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    r = rng.integers(0, 120, size=400) / 100.0  # ~3 items per tie block
    p = rng.random(400) ** 4  # uneven weights, like a softmax over sequence log-probs
    z = increase_variance(r, p, 0.0, 1.5)
    np.testing.assert_allclose(z, enumerate_optimum(r, p, 0.0, 1.5), atol=1e-9)
    assert f_value(one_pass_walk(r, p, 0.0, 1.5), p) == pytest.approx(f_value(z, p), abs=1e-9)


@FAST
@given(groups())
def test_feasibility_and_shape_invariants(case):
    r, p, low, high = case
    z = increase_variance(r, p, low, high)
    m, M = bounds_of(r, low, high)
    assert np.all(z >= m) and np.all(z <= M)  # bounds kept (exactly: α is clamped)
    assert abs(p @ z - p @ r) / p.sum() <= 1e-9  # weighted mean kept
    assert f_value(z, p) >= f_value(r, p) - 1e-12  # f never lowered
    z_i, z_j = np.meshgrid(z, z, indexing="ij")
    assert np.all(z_i[r[:, None] > r[None, :]] >= z_j[r[:, None] > r[None, :]])  # weak order kept
    assert np.all(z_i[r[:, None] == r[None, :]] == z_j[r[:, None] == r[None, :]])  # ties stay tied
    weighted_values = np.unique(z[p > 0])  # zero-weight items can't matter to f
    assert len(weighted_values) <= 3
    assert np.sum((weighted_values > m) & (weighted_values < M)) <= 1  # vertex form (M, α, m)


@FAST
@given(groups())
def test_already_optimal_is_a_fixed_point(case):
    r, p, low, high = case
    z = increase_variance(r, p, low, high)
    np.testing.assert_array_equal(increase_variance(z, p, low, high), z)


@FAST
@given(groups(), st.randoms(use_true_random=False))
def test_output_follows_input_order(case, rnd):
    r, p, low, high = case
    perm = np.array(rnd.sample(range(len(r)), len(r)))
    z = increase_variance(r, p, low, high)
    np.testing.assert_allclose(increase_variance(r[perm], p[perm], low, high), z[perm], atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=16), st.lists(st.floats(0.01, 1.0), min_size=16, max_size=16))
def test_binary_rewards_unchanged(bits, weights):
    r = np.array(bits)
    p = np.array(weights[: len(r)])
    np.testing.assert_array_equal(increase_variance(r, p, 0.0, 1.0), r)
    np.testing.assert_array_equal(increase_variance(r, p), r)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=12))
def test_arbitrary_floats_stay_feasible(values):
    r = np.array(values)
    z = increase_variance(r)
    assert np.all(np.isfinite(z)) and np.all(z >= r.min()) and np.all(z <= r.max())
    assert abs(z.mean() - r.mean()) <= 1e-9 * max(1.0, np.abs(r).max())
    assert weighted_variance(z) >= weighted_variance(r) - 1e-12 * max(1.0, r.max() - r.min()) ** 2


def test_zero_variance_group_unchanged():
    for r in (np.full(5, 0.3), np.array([2.0]), np.full(4, -1.0)):
        np.testing.assert_array_equal(increase_variance(r), r)
        np.testing.assert_array_equal(increase_variance(r, low=-5.0, high=5.0), r)


def test_tie_block_is_not_split():
    # Without tie blocks the mean would put α on part of the tied 0.5s and M on the rest.
    r = np.array([0.5, 0.5, 0.5, 0.0])
    z = increase_variance(r, low=0.0, high=1.0)
    assert z[0] == z[1] == z[2]
    np.testing.assert_array_equal(z, r)  # one block straddles t = 0.375: α = 0.5, nothing to gain


# ------------------------------------------------------------------- worked examples
def test_worked_example_uniform():
    r = np.array([0.1, 0.4, 0.5, 0.9])
    z = increase_variance(r, low=0.0, high=1.0)
    np.testing.assert_allclose(z, [0.0, 0.0, 0.9, 1.0], atol=1e-12)
    assert weighted_variance(r) == pytest.approx(0.081875, abs=1e-12)
    assert weighted_variance(z) == pytest.approx(0.226875, abs=1e-12)


def test_worked_example_weighted():
    r = np.array([0.9, 0.5, 0.4, 0.1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    z = increase_variance(r, p, 0.0, 1.0)
    np.testing.assert_allclose(z, [1.0, 1.0, 1 / 6, 0.0], atol=1e-12)
    assert f_value(z, p) == pytest.approx(0.308333333, abs=1e-9)
    assert weighted_variance(r, p) == pytest.approx(0.0605, abs=1e-12)
    assert weighted_variance(z, p) == pytest.approx(0.185833333, abs=1e-9)


def test_worked_example_grpo_advantages():
    z = torch.tensor(increase_variance(np.array([0.1, 0.4, 0.5, 0.9]), low=0.0, high=1.0))
    adv = (z - z.mean()) / (z.std() + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([-0.8636, -0.8636, 0.7727, 0.9545], dtype=torch.float64), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- batched
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1), st.sampled_from(["none", "float", "tensor"]))
def test_batched_equals_single_row_by_row(G, n, seed, bound_kind):
    rng = np.random.default_rng(seed)
    r = torch.from_numpy(rng.integers(0, 6, size=(G, n)) / 5.0)  # small grid: many ties, some binary rows
    p = torch.from_numpy(rng.random((G, n)) * (rng.random((G, n)) > 0.1) + 1e-3 * (rng.random((G, n)) > 0.5))
    p[p.sum(dim=1) == 0, 0] = 1.0
    low = {"none": None, "float": -0.5, "tensor": r.amin(dim=1) - torch.from_numpy(rng.random(G))}[bound_kind]
    high = {"none": None, "float": 1.5, "tensor": r.amax(dim=1) + torch.from_numpy(rng.random(G))}[bound_kind]
    batched = increase_variance_groups(r, p, low, high)
    for g in range(G):
        lo = low if not isinstance(low, torch.Tensor) else float(low[g])
        hi = high if not isinstance(high, torch.Tensor) else float(high[g])
        torch.testing.assert_close(batched[g], increase_variance(r[g], p[g], lo, hi), atol=1e-12, rtol=0)


def test_types_dtypes_and_devices_preserved():
    r32 = np.array([0.1, 0.4, 0.5, 0.9], dtype=np.float32)
    out = increase_variance(r32, low=0.0, high=1.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    t = torch.tensor([0.1, 0.4, 0.5, 0.9], dtype=torch.bfloat16)
    out_t = increase_variance(t)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.bfloat16
    ints = torch.tensor([[0, 1, 1, 3]])
    assert increase_variance_groups(ints).dtype == torch.get_default_dtype()  # α need not be an integer
    assert isinstance(enumerate_optimum(t.float()), torch.Tensor)
    np.testing.assert_allclose(increase_variance([0.1, 0.4, 0.5, 0.9], low=0.0, high=1.0), [0.0, 0.0, 0.9, 1.0], atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    r = torch.rand(64, 16, dtype=torch.float64)
    p = torch.rand(64, 16, dtype=torch.float64)
    cpu = increase_variance_groups(r, p, 0.0, 1.0)
    gpu = increase_variance_groups(r.cuda(), p.cuda(), 0.0, 1.0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ errors, helpers
def test_bad_input_gets_clear_errors():
    r = np.array([0.2, 0.8])
    with pytest.raises(ValueError, match="outside"):
        increase_variance(r, low=0.5, high=1.0)
    with pytest.raises(ValueError, match="probs_from_logps"):
        increase_variance(r, np.array([0.5, -0.1]))
    with pytest.raises(ValueError, match="NaN"):
        increase_variance(np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match="increase_variance_groups"):
        increase_variance(np.ones((2, 2)))
    with pytest.raises(ValueError, match="one entry per group"):
        increase_variance_groups(torch.rand(3, 4), high=torch.ones(2))


def test_probs_from_logps_softmax_and_fallback():
    logps = torch.tensor([[-10.0, -11.0, -12.0], [-5.0, float("nan"), -1.0], [-900.0, -1000.0, -2000.0]])
    p = probs_from_logps(logps)
    torch.testing.assert_close(p[0], torch.softmax(logps[0], dim=0))
    torch.testing.assert_close(p[1], torch.full((3,), 1 / 3))  # non-finite row: uniform
    assert torch.isfinite(p).all() and p[2, 0] > 0.99  # large log-probs don't underflow to NaN
    torch.testing.assert_close(p.sum(dim=1), torch.ones(3))
    flat = probs_from_logps(logps[:1], temperature=1e9)
    torch.testing.assert_close(flat, torch.full((1, 3), 1 / 3))


def test_metrics_report_the_increase():
    r = torch.tensor([[0.1, 0.4, 0.5, 0.9], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    z = increase_variance_groups(r, low=0.0, high=1.0)
    m = variance_increase_metrics(r, z)
    assert m["reward/var_before"] == pytest.approx((0.081875 + 0.25) / 2)
    assert m["reward/var_after"] == pytest.approx((0.226875 + 0.25) / 2)
    assert m["reward/var_groups_changed"] == pytest.approx(0.5)
    assert m["reward/var_groups_with_spread"] == pytest.approx(1.0)
    flat = torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.1, 0.4, 0.5, 0.9]], dtype=torch.float64)
    m = variance_increase_metrics(flat, increase_variance_groups(flat, low=0.0, high=1.0))
    assert m["reward/var_groups_changed"] == pytest.approx(0.5)  # the flat group cannot change ...
    assert m["reward/var_groups_with_spread"] == pytest.approx(0.5)  # ... and is not counted as able to
