"""Grokking pathway monitors (algorithms.md §5, §6 "Grokking pathways")."""

from __future__ import annotations

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bridgerl.monitor.pathways import (
    PathwayMonitor,
    adjacent_cosines,
    choose_epsilon,
    consistency,
    group_distance,
    kept_experts,
    memorisation_times,
    pairwise_distances,
    pathway_distance,
    pathway_metrics,
    pathway_strings,
    pathway_tokens,
    routing_embeddings,
)
from bridgerl.monitor.routing import (
    RoutingCapture,
    collect_routing,
    find_router_gates,
    router_aux_losses,
    token_averaged_weights,
)

BACKENDS = ["bitparallel", "rapidfuzz"]
FAST = settings(max_examples=40, deadline=None)


def reference_levenshtein(a, b) -> int:
    """Textbook Wagner–Fischer DP, the yardstick for the fast kernels."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def backend_available(backend: str) -> bool:
    return backend != "rapidfuzz" or importlib.util.find_spec("rapidfuzz") is not None


@pytest.fixture(params=BACKENDS)
def backend(request):
    if not backend_available(request.param):
        pytest.skip("rapidfuzz not installed")
    return request.param


weight_vectors = hnp.arrays(np.float64, st.integers(1, 12), elements=st.floats(0.0, 1.0)).filter(
    lambda w: w.sum() > 1e-3
)
pathway_text = st.lists(st.lists(st.integers(0, 15), min_size=1, max_size=4), min_size=1, max_size=5).map(
    lambda layers: "-".join(",".join(map(str, layer)) for layer in layers)
)


# ---------------------------------------------------------------- kept experts and strings


def test_worked_example_keeps_experts_1_3_4():
    order, n_kept = kept_experts(np.array([0.05, 0.30, 0.10, 0.25, 0.20, 0.10]), tau=0.7)
    assert order[:n_kept].tolist() == [1, 3, 4]


@FAST
@given(raw=weight_vectors, tau=st.floats(0.05, 0.95))
def test_kept_set_is_shortest_prefix_above_tau(raw, tau):
    weights = raw / raw.sum()
    order, n_kept = kept_experts(weights, tau)
    kept = weights[order[:n_kept]]
    assert n_kept >= 1
    assert np.all(np.diff(kept) <= 0), "kept weights must be non-increasing"
    assert sorted(order.tolist()) == list(range(len(weights)))
    if n_kept < len(weights):
        assert kept.sum() > tau
    assert kept[:-1].sum() <= tau, "a shorter prefix would already exceed tau"


def test_pathway_string_format_and_tokens():
    weights = np.array([[[0.05, 0.30, 0.10, 0.25, 0.20, 0.10], [0.0, 0.0, 0.9, 0.1, 0.0, 0.0]]])
    (text,) = pathway_strings(weights, tau=0.7)
    assert text == "1,3,4-2"
    assert pathway_tokens(text) == [1, 3, 4, -1, 2]


# ---------------------------------------------------------------- edit distance


def test_worked_example_distances(backend):
    assert pathway_distance("3,1,5-9,1", "3,5-9,1,2", "char", backend) == 4
    assert pathway_distance("3,1,5-9,1", "3,5-9,1,2", "expert", backend) == 2


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="level"):
        pathway_distance("1", "2", level="word")


@FAST
@given(a=pathway_text, b=pathway_text, c=pathway_text)
def test_edit_distance_is_a_metric_and_matches_reference(a, b, c):
    for backend in [b_ for b_ in BACKENDS if backend_available(b_)]:
        for level in ("char", "expert"):
            d = lambda x, y: pathway_distance(x, y, level, backend)  # noqa: E731
            assert d(a, a) == 0
            assert d(a, b) == d(b, a)
            assert d(a, c) <= d(a, b) + d(b, c)
            units = (lambda s: s) if level == "char" else pathway_tokens
            assert d(a, b) == reference_levenshtein(units(a), units(b))


@FAST
@given(a=st.text("ab,-1", max_size=80), b=st.text("ab,-1", max_size=80))
def test_char_distance_matches_reference_on_any_text(a, b):
    """Covers empty strings and lengths beyond one 64-bit word of the bit-vector kernel."""
    for backend in [b_ for b_ in BACKENDS if backend_available(b_)]:
        assert pathway_distance(a, b, "char", backend) == reference_levenshtein(a, b)


@settings(max_examples=15, deadline=None)
@given(texts=st.lists(pathway_text, min_size=2, max_size=8))
def test_pairwise_matrix_matches_pair_distances(texts):
    for backend in [b_ for b_ in BACKENDS if backend_available(b_)]:
        matrix = pairwise_distances(texts, "char", backend)
        expected = [[reference_levenshtein(x, y) for y in texts] for x in texts]
        assert matrix.tolist() == expected
        upper = [expected[i][j] for i in range(len(texts)) for j in range(i + 1, len(texts))]
        assert group_distance(texts, "char", backend) == pytest.approx(np.mean(upper))


def test_identical_routing_gives_zero_group_distance():
    rng = np.random.default_rng(0)
    one = rng.dirichlet(np.ones(8), size=(1, 4))
    texts = pathway_strings(np.repeat(one, 5, axis=0), tau=0.7)
    assert group_distance(texts, "char") == 0.0
    assert group_distance(texts, "expert") == 0.0


# ---------------------------------------------------------------- consistency


def test_identical_layer_embeddings_give_smoothness_one():
    rng = np.random.default_rng(1)
    rows = np.repeat(rng.normal(size=(1, 6, 16)), 4, axis=0)  # same router in all 4 layers
    weights = np.repeat(rng.dirichlet(np.ones(6), size=(3, 1)), 4, axis=1)  # same routing per layer
    c_value, cos = consistency(weights, rows)
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)
    np.testing.assert_allclose(c_value, 0.0, atol=1e-7)
    np.testing.assert_allclose(1 - c_value, 1.0, atol=1e-7)


@FAST
@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(2, 6))
def test_cosines_bounded_and_invariant_to_positive_row_scaling(seed, layers):
    """What holds: scaling every router row of a layer by c_ℓ > 0 scales e_{i,ℓ} by c_ℓ,
    so cosines, C and S are unchanged for the same routing weights. (Rescaling the router
    inside a model also rescales its logits, which changes the softmax routing itself.)"""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(5), size=(4, layers))
    rows = rng.normal(size=(layers, 5, 8))
    scales = rng.uniform(0.01, 100.0, size=(layers, 1, 1))
    c_value, cos = consistency(weights, rows)
    c_scaled, cos_scaled = consistency(weights, rows * scales)
    assert np.all(np.abs(cos) <= 1.0)
    np.testing.assert_allclose(cos_scaled, cos, atol=1e-9)
    np.testing.assert_allclose(c_scaled, c_value, atol=1e-9)
    metrics = pathway_metrics(weights, rows, per_layer=False)
    assert metrics == pytest.approx(pathway_metrics(weights, rows * scales, per_layer=False))


def test_routing_embedding_is_weighted_sum_of_rows():
    rng = np.random.default_rng(2)
    weights, rows = rng.dirichlet(np.ones(3), size=(2, 2)), rng.normal(size=(2, 3, 4))
    emb = routing_embeddings(weights, rows)
    np.testing.assert_allclose(emb[1, 0], sum(weights[1, 0, k] * rows[0, k] for k in range(3)))
    manual = emb[:, 0] @ emb[:, 1].T
    norms = np.linalg.norm(emb[:, 0], axis=1) * np.linalg.norm(emb[:, 1], axis=1)
    np.testing.assert_allclose(adjacent_cosines(emb)[:, 0], np.diag(manual) / norms)


# ---------------------------------------------------------------- memorisation (§5.1)


def test_memorisation_times_on_hand_made_losses():
    losses = np.array(
        [  # s0 settles at t=2; s1 dips, rises, settles at t=3; s2 never low; s3 low but drifts > δ until t=3
            [3.0, 3.0, 3.0, 0.10],
            [0.5, 0.1, 2.0, 0.10],
            [0.1, 0.5, 1.0, 0.10],
            [0.1, 0.1, 0.5, 0.15],
            [0.1, 0.1, 0.3, 0.19],
        ]
    )
    assert memorisation_times(losses, epsilon=0.2, delta=0.05).tolist() == [2, 3, -1, 3]
    assert memorisation_times(losses, epsilon=0.2, delta=1.0).tolist() == [2, 3, -1, 0]


@FAST
@given(losses=hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 5)), elements=st.floats(0, 1)))
def test_memorisation_time_is_earliest_checkpoint_where_conditions_hold_onwards(losses):
    epsilon, delta = 0.5, 0.2
    holds = lambda t, i: losses[t, i] <= epsilon and abs(losses[t, i] - losses[-1, i]) <= delta  # noqa: E731
    times = memorisation_times(losses, epsilon, delta)
    n_ckpt = losses.shape[0]
    for i, t_star in enumerate(times):
        valid = [t for t in range(n_ckpt) if all(holds(u, i) for u in range(t, n_ckpt))]
        assert t_star == (valid[0] if valid else -1)


@pytest.mark.parametrize("target", [0.2, 0.25])
def test_choose_epsilon_hits_target_fraction(target):
    losses = np.random.default_rng(3).gamma(2.0, size=(6, 200)).cumsum(axis=0)[::-1]
    epsilon = choose_epsilon(losses, target)
    memorised = (memorisation_times(losses, epsilon, delta=np.inf) >= 0).mean()
    assert memorised == pytest.approx(np.ceil(target * 200) / 200)


# ---------------------------------------------------------------- hooks on real tiny MoE models


def tiny_moe(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, num_experts_per_tok=2,
    )  # fmt: skip
    if kind == "olmoe":
        from transformers import OlmoeConfig, OlmoeForCausalLM

        model = OlmoeForCausalLM(OlmoeConfig(num_experts=6, **common))
    elif kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        config = Qwen2MoeConfig(
            num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=16, mlp_only_layers=[1], **common
        )
        model = Qwen2MoeForCausalLM(config)
    else:
        from transformers import MixtralConfig, MixtralForCausalLM

        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, **common))
    return model.eval()


@pytest.mark.parametrize("kind,n_moe_layers", [("olmoe", 3), ("qwen2_moe", 2), ("mixtral", 3)])
def test_hooks_match_output_router_logits(kind, n_moe_layers):
    model = tiny_moe(kind)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad(), RoutingCapture(model) as cap:
        out = model(input_ids=ids, output_router_logits=True)
    logits = cap.router_logits()
    assert len(logits) == n_moe_layers == len(out.router_logits)
    for hooked, reference in zip(logits, out.router_logits):
        assert hooked.shape[:2] == (2, 7)
        torch.testing.assert_close(hooked.reshape(reference.shape), reference)
        torch.testing.assert_close(cap.router_probs()[0].sum(-1), torch.ones(2, 7))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 50, (1, 3)))  # hooks are gone: the capture must not change
    assert cap.router_logits()[0].shape[:2] == (2, 7)


def test_aux_losses_match_transformers_and_train_the_routers():
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    model = tiny_moe("olmoe").train()
    ids = torch.randint(0, 50, (3, 5))
    with RoutingCapture(model) as detached:
        model(input_ids=ids)
    assert not any(x.requires_grad for x in detached.router_logits())
    with RoutingCapture(model, keep_graph=True) as cap:
        out = model(input_ids=ids, output_router_logits=True)
    logits = cap.router_logits()
    losses = router_aux_losses(logits, top_k=2)
    reference = load_balancing_loss_func(out.router_logits, 6, 2)
    torch.testing.assert_close(losses["load_balance"], reference)
    flat = torch.cat([x.reshape(-1, 6) for x in logits])
    torch.testing.assert_close(losses["z_loss"], (torch.logsumexp(flat, -1) ** 2).mean())
    (losses["load_balance"] + losses["z_loss"]).backward()
    for gate in find_router_gates(model):
        assert gate.module.weight.grad is not None and gate.module.weight.grad.abs().sum() > 0
    # Perfectly balanced uniform routing gives exactly top_k; padding is left out.
    uniform = [torch.zeros(2, 4, 6)]
    assert router_aux_losses(uniform, 2)["load_balance"].item() == pytest.approx(2.0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    padded = [torch.cat([logits[0][:1, :2], torch.full((1, 2, 6), 50.0)], 1).detach()]
    padded[0] = torch.cat([padded[0], logits[0][1:2, :4].detach()])
    unpadded = [torch.cat([logits[0][0, :2], logits[0][1, :4]]).detach()]
    torch.testing.assert_close(router_aux_losses(padded, 2, mask)["z_loss"], router_aux_losses(unpadded, 2)["z_loss"])


def test_padding_is_excluded_left_and_right():
    model = tiny_moe("olmoe")
    short, long_ = torch.randint(1, 50, (1, 4)), torch.randint(1, 50, (1, 9))
    alone = torch.cat([collect_routing(model, x)[0] for x in (short, long_)])
    pad = torch.zeros(1, 5, dtype=torch.long)
    for padded_short in (torch.cat([short, pad], 1), torch.cat([pad, short], 1)):
        ids = torch.cat([padded_short, long_])
        mask = (torch.arange(9) < 4).long()[None] if padded_short[0, 0] != 0 else (torch.arange(9) >= 5).long()[None]
        mask = torch.cat([mask, torch.ones(1, 9, dtype=torch.long)])
        weights, rows = collect_routing(model, ids, mask)
        torch.testing.assert_close(weights, alone, atol=1e-5, rtol=1e-4)
        assert pathway_strings(weights.numpy()) == pathway_strings(alone.numpy())
        got, want = pathway_metrics(weights.numpy(), rows.numpy()), pathway_metrics(alone.numpy(), rows.numpy())
        assert got == pytest.approx(want, abs=1e-5)


def test_masked_average_ignores_nan_at_padding():
    probs = torch.softmax(torch.randn(2, 3, 4), -1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    poisoned = probs.clone()
    poisoned[0, 2] = float("nan")
    avg = token_averaged_weights(poisoned, mask)
    torch.testing.assert_close(avg[0], probs[0, :2].mean(0))
    torch.testing.assert_close(avg[1], probs[1].mean(0))


def test_monitor_measures_and_restores_mode():
    model = tiny_moe("olmoe").train()
    ids = torch.randint(0, 50, (6, 5))
    metrics = PathwayMonitor(ids, tau=0.7).measure(model)
    assert model.training
    for key in ("pathways/distance", "pathways/consistency", "pathways/smoothness", "pathways/layer_00/distance"):
        assert np.isfinite(metrics[key])
    assert metrics["pathways/smoothness"] == pytest.approx(1 - metrics["pathways/consistency"])
    same = PathwayMonitor(ids[:1].repeat(4, 1)).measure(model)
    assert same["pathways/distance"] == 0.0
    assert len(find_router_gates(model)) == 3


def test_dense_model_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    assert find_router_gates(dense) == []
    with pytest.raises(ValueError, match="MoE"):
        PathwayMonitor(torch.randint(0, 50, (2, 3))).measure(dense)
