"""bench/grokking.py's analysis helpers: the shuffled-experts baseline and the rise window."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from conftest import load_bench

from bridgerl.monitor.pathways import group_distance, kept_experts, pathway_strings


@pytest.fixture(scope="module")
def bench():
    return load_bench("grokking")


def test_shuffle_keeps_each_samples_weights_and_breaks_shared_routes(bench):
    rng = np.random.default_rng(0)
    one = rng.dirichlet(np.full(8, 0.3), size=(1, 3))
    weights = np.repeat(one, 64, axis=0)  # every sample routes identically: distance 0
    shuffled = bench.shuffle_experts(weights, rng)
    np.testing.assert_allclose(np.sort(shuffled, -1), np.sort(weights, -1))  # same multiset per (sample, layer)
    np.testing.assert_array_equal(kept_experts(shuffled)[1], kept_experts(weights)[1])  # same pathway lengths
    assert group_distance(pathway_strings(weights)) == 0.0
    assert bench.shuffled_distance(weights, 0.7, "char", 2, rng) > 1.0  # identities no longer shared


def test_rise_window_runs_from_onset_to_plateau(bench):
    acc = np.array([0.0, 0.01, 0.02, 0.3, 0.5, 0.7, 0.96, 0.6, 1.0, 1.0])
    onset = bench.rise_onset(acc)
    assert onset == 3
    assert bench.rise_end(acc, onset, 0.95) == 6  # first checkpoint at ≥ 95% of the maximum
    assert bench.rise_end(acc, onset, 0.999) == 8


def test_correlations_are_rebuilt_from_saved_series(bench):
    acc = np.array([0.0, 0.01, 0.02, 0.3, 0.5, 0.7, 0.96, 0.6, 1.0, 1.0])
    record = {"steps": list(range(0, 100, 10)), "test_acc": acc.tolist(), "router_top1": [0.3] * 10}
    for name in bench.METRICS[:-1]:  # the last is "steps", time itself
        record[name] = (-acc + 0.01 * np.arange(10)).tolist()  # tracks accuracy down to its dips
    record = bench.add_correlations(record, 0.95)
    assert (record["rise_onset_step"], record["rise_end_step"], record["rise_checkpoints"]) == (30, 60, 4)
    pearson, spearman = record["correlations"]["rise"]["rel_distance_char"]
    assert pearson < -0.99 and spearman == pytest.approx(-1.0)
    assert record["correlations"]["rise_changes"]["distance_char"][0] < -0.99


def test_mirror_share_and_spike_proof_grok_onset(bench):
    share = bench.mirror_share(23, 0.5, seed=0)
    assert 0.4 < share < 0.6  # about half the test pairs have their mirror (b, a) in training
    assert bench.mirror_share(23, 0.999, seed=0) == 1.0  # the one test pair's mirror trains
    acc = np.array([0.0, 0.5, 0.5, 0.5, 0.6, 0.7, 0.5, 0.8, 0.9, 1.0, 1.0, 1.0])  # a spike at index 6
    assert bench.rise_onset(acc, floor=0.5, min_jump=0.1) == 7
    assert bench.rise_onset(bench.running_median(acc, 3), floor=0.5, min_jump=0.1) == 4
