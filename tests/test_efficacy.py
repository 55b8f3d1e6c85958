"""DELT invariants (algorithms.md §4 and §6): orderings, selection, normalisation, the LQS γ formula,
torch.func per-sample gradients and HVPs against plain autograd, and the learned scorer head."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgerl.data.efficacy import (
    align_scores,
    apply_efficacy,
    fold_order,
    load_scores,
    plot_score_histogram,
    save_scores,
    select_threshold,
    select_top_k,
    select_top_ratio,
    shuffle_order,
    sorted_order,
    spearman,
    top_ratio_count,
    zscore_clip,
)
from bridgerl.data.lqs import (
    hessian_vector_product,
    lqs_gamma,
    lqs_scores,
    per_sample_grad_stats,
    per_sample_grads,
    proxy_batch_schedule,
)
from bridgerl.data.scorers import (
    fit_score_head,
    loss_scores,
    make_loss_fns,
    mean_pooled_features,
    pass_rate_scores,
    perplexity_scores,
    samples_from_prompt_lengths,
    predict_scores,
    scoring_mode,
    split_params,
    to_token_batch,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST = settings(max_examples=60, deadline=None)
# torch scripts its forward-AD decompositions on first use and warns that jit.script is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
# Few distinct values so ties are common: orderings must stay permutations through ties.


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine spinning threads
    slow these tests by orders of magnitude; restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


score_lists = st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.5]) | st.floats(-1e3, 1e3), max_size=40)


# ---------------------------------------------------------------- orderings

@FAST
@given(score_lists, st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_every_ordering_is_a_permutation(scores, folds, seed):
    n = len(scores)
    for perm in (shuffle_order(n, seed), sorted_order(scores), sorted_order(scores, descending=True),
                 fold_order(scores, folds)):
        assert perm.dtype == np.int64
        assert sorted(perm.tolist()) == list(range(n))


@FAST
@given(score_lists)
def test_one_fold_is_the_ascending_sort(scores):
    assert np.array_equal(fold_order(scores, 1), sorted_order(scores))
    assert np.all(np.diff(np.asarray(scores)[sorted_order(scores)]) >= 0) if scores else True


@FAST
@given(score_lists, st.integers(1, 7))
def test_each_fold_is_non_decreasing_with_expected_size(scores, folds):
    n = len(scores)
    values = np.asarray(scores, dtype=np.float64)[fold_order(scores, folds)]
    start = 0
    for j in range(folds):
        size = math.ceil((n - j) / folds) if n > j else 0
        block = values[start : start + size]
        assert block.size == size
        assert np.all(np.diff(block) >= 0)
        start += size
    assert start == n


def test_fold_example_n9_l3():
    rng = np.random.default_rng(3)
    a = np.arange(9, dtype=float) * 1.5 - 4  # a_0 < a_1 < ... < a_8
    where = rng.permutation(9)  # a_i is stored at position where[i]
    scores = np.empty(9)
    scores[where] = a
    out = scores[fold_order(scores, 3)]
    assert out.tolist() == [a[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]


def test_sorting_is_stable_on_ties():
    scores = [1.0, 0.0, 1.0, 0.0, 1.0]
    assert sorted_order(scores).tolist() == [1, 3, 0, 2, 4]
    assert sorted_order(scores, descending=True).tolist() == [0, 2, 4, 1, 3]


def test_shuffle_is_seeded():
    assert np.array_equal(shuffle_order(50, 7), shuffle_order(50, 7))
    assert not np.array_equal(shuffle_order(50, 7), shuffle_order(50, 8))


# ---------------------------------------------------------------- selection

@FAST
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.floats(0, 1))
def test_top_ratio_keeps_floor_rn_best(scores, ratio):
    n = len(scores)
    kept = select_top_ratio(scores, ratio)
    assert kept.size == top_ratio_count(n, ratio) == math.floor(ratio * n + 1e-9)
    assert np.all(np.diff(kept) > 0)  # ascending, unique
    dropped = np.setdiff1d(np.arange(n), kept)
    arr = np.asarray(scores)
    if kept.size and dropped.size:
        assert arr[kept].min() >= arr[dropped].max()


def test_top_ratio_one_keeps_all_and_float_floor():
    assert select_top_ratio(np.random.default_rng(0).normal(size=13), 1.0).tolist() == list(range(13))
    assert top_ratio_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert select_top_k([5.0, 1.0, 5.0, 5.0], 2).tolist() == [0, 2]  # ties keep the earlier samples
    with pytest.raises(ValueError, match="ratio"):
        select_top_ratio([1.0], 1.5)


@FAST
@given(st.lists(st.floats(-10, 10), max_size=30), st.floats(-10, 10))
def test_threshold_keeps_strictly_above(scores, tau):
    kept = select_threshold(scores, tau)
    arr = np.asarray(scores, dtype=np.float64)
    assert np.all(arr[kept] > tau)
    assert np.all(arr[np.setdiff1d(np.arange(arr.size), kept)] <= tau)


@FAST
@given(st.lists(st.floats(-100, 100), min_size=1, max_size=40), st.floats(0.05, 1), st.integers(1, 4))
def test_apply_efficacy_selects_then_orders_with_same_scores(scores, ratio, folds):
    arr = np.asarray(scores)
    out = apply_efficacy(arr, select="top_ratio", ratio=ratio, order="folding", folds=folds)
    kept = select_top_ratio(arr, ratio)
    assert sorted(out.tolist()) == kept.tolist()
    assert np.array_equal(arr[out], arr[kept][fold_order(arr[kept], folds)])
    assert np.array_equal(apply_efficacy(arr, order="sorted"), sorted_order(arr))
    assert np.array_equal(apply_efficacy(arr, order="shuffle", seed=3), shuffle_order(arr.size, 3))


def test_apply_efficacy_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        apply_efficacy([0.0, float("nan")])
    with pytest.raises(ValueError, match="order"):
        apply_efficacy([0.0, 1.0], order="zigzag")
    with pytest.raises(ValueError, match="needs k"):
        apply_efficacy([0.0, 1.0], select="top_k")


# ---------------------------------------------------------------- normalisation, ranks, files

@FAST
@given(st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=10))
def test_zscore_without_clipping_has_mean0_std1(scores):
    arr = np.asarray(scores)
    if arr.std() < 1e-6 * max(1.0, np.abs(arr).max()):
        return  # numerically constant
    z = zscore_clip(arr)
    # n <= 10 samples cannot have |z| > sqrt(n - 1) <= 3, so clipping never acts here.
    assert np.all(np.abs(z) <= 3 + 1e-9)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9


def test_zscore_clips_outliers_and_keeps_the_rest():
    arr = np.concatenate([np.random.default_rng(0).normal(size=200), [40.0, -40.0]])
    z = zscore_clip(arr)
    raw = (arr - arr.mean()) / arr.std()
    assert z.min() == -3 and z.max() == 3
    inside = np.abs(raw) <= 3
    assert np.allclose(z[inside], raw[inside])
    assert np.array_equal(zscore_clip([2.0, 2.0, 2.0]), np.zeros(3))


def test_spearman_matches_definition():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 40).astype(float)  # many ties
    b = a + rng.normal(size=40)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("suffix", [".jsonl", ".npy"])
def test_scores_file_roundtrip(tmp_path, suffix):
    scores = np.random.default_rng(1).normal(size=7)
    ids = [f"row-{i}" for i in range(7)]
    path = save_scores(tmp_path / f"s{suffix}", scores, ids)
    back, back_ids = load_scores(path)
    assert back_ids == ids and np.array_equal(back, scores)
    assert np.array_equal(align_scores(back, back_ids, ids[::-1]), scores[::-1])
    with pytest.raises(KeyError, match="no score"):
        align_scores(back, back_ids, ["row-0", "missing"])


def test_scores_file_errors_name_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 0, "score": 1.0}\n{"id": 1}\n')
    with pytest.raises(ValueError, match=r"row 2: missing field 'score'"):
        load_scores(path)


def test_histogram_png(tmp_path):
    out = plot_score_histogram(np.random.default_rng(0).normal(size=100), tmp_path / "h" / "scores.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- LQS γ formula (pure)

def test_lqs_gamma_hand_example():
    dots = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    norms = torch.tensor([[2.0, 2.0], [4.0, 1.0]], dtype=torch.float64)
    # Row 0 divides by row 1's norms; the last row by 1 (code) or by the final-checkpoint norms.
    assert lqs_gamma(dots, norms).tolist() == [1 / 4 + 3, 2 / 1 + 4]
    assert lqs_gamma(dots, norms, torch.tensor([3.0, 8.0]), lr=2.0).tolist() == [2 * (1 / 4 + 1), 2 * (2 + 0.5)]


# ---------------------------------------------------------------- tiny model fixtures

def tiny_llama(seed: int = 0, tie: bool = False, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def random_samples(n: int, seed: int, lo: int = 4, hi: int = 11, prompt: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(2, 64, rng.integers(lo, hi)).tolist() for _ in range(n)]
    return {"input_ids": ids, "labels_mask": [[0] * prompt + [1] * (len(r) - prompt) for r in ids]}


def hf_sample_loss(model, ids, mask, params=None):
    """The independent path: one unpadded sample through the model's own label-masked loss."""
    x = torch.tensor([ids])
    labels = torch.where(torch.tensor([mask]) > 0, x, torch.full_like(x, -100))
    if params is None:
        return model(input_ids=x, labels=labels).loss
    return torch.func.functional_call(model, params, (x,), {"labels": labels}).loss


@pytest.mark.parametrize("tie", [False, True])
def test_vmap_per_sample_grads_match_a_plain_loop(tie):
    model = tiny_llama(tie=tie)
    samples = random_samples(5, seed=1)
    data = to_token_batch(samples)
    attn = model.config._attn_implementation
    with scoring_mode(model):
        theta, frozen = split_params(model)
        _, sample_loss = make_loss_fns(model, frozen)
        fast = per_sample_grads(sample_loss, theta, data)
        lam = {k: torch.randn_like(v) for k, v in theta.items()}
        dots, norms = per_sample_grad_stats(sample_loss, theta, data, lam, chunk_size=2)
    for i, (ids, mask) in enumerate(zip(samples["input_ids"], samples["labels_mask"])):
        model.zero_grad()
        hf_sample_loss(model, ids, mask).backward()  # default (SDPA) attention, no padding
        slow = {n: p.grad for n, p in model.named_parameters()}
        for name in theta:
            torch.testing.assert_close(fast[name][i], slow[name], rtol=1e-4, atol=1e-6)
        flat = torch.cat([slow[n].flatten() for n in theta]).double()
        assert norms[i].item() == pytest.approx(flat.norm().item(), rel=1e-4)
        lam_flat = torch.cat([lam[n].flatten() for n in theta]).double()
        assert dots[i].item() == pytest.approx((flat @ lam_flat).item(), rel=1e-4, abs=1e-6)
    assert model.config._attn_implementation == attn  # scoring_mode restored the attention


def test_hvp_matches_explicit_hessian_and_finite_differences():
    model = tiny_llama(seed=2, dtype=torch.float64)
    data = to_token_batch(random_samples(4, seed=3))
    subset = ["model.norm.weight", "model.layers.0.self_attn.o_proj.weight"]
    with scoring_mode(model):
        theta, frozen = split_params(model, subset)
        batch_loss, _ = make_loss_fns(model, frozen)
        vec = {k: torch.randn_like(v) for k, v in theta.items()}
        names, shapes = list(theta), [v.shape for v in theta.values()]
        sizes = [v.numel() for v in theta.values()]

        def flat_loss(flat):
            parts = dict(zip(names, (p.reshape(s) for p, s in zip(flat.split(sizes), shapes))))
            return batch_loss(parts, data.ids, data.mask)

        flat_theta = torch.cat([theta[n].flatten() for n in names])
        hessian = torch.autograd.functional.hessian(flat_loss, flat_theta, vectorize=True)
        expected = hessian @ torch.cat([vec[n].flatten() for n in names])
        for mode in ("fwdrev", "revrev"):
            hv = hessian_vector_product(batch_loss, theta, data, vec, chunk_size=3, mode=mode)
            # Llama's RMSNorm computes in float32 even in a float64 model, hence float32-level tolerances.
            torch.testing.assert_close(torch.cat([hv[n].flatten() for n in names]), expected, rtol=1e-5, atol=1e-6)

        # All parameters: central finite difference of the gradient along v.
        theta, frozen = split_params(model)
        batch_loss, _ = make_loss_fns(model, frozen)
        vec = {k: torch.randn_like(v) for k, v in theta.items()}
        eps = 1e-4
        g_plus = torch.func.grad(batch_loss)({k: theta[k] + eps * vec[k] for k in theta}, data.ids, data.mask)
        g_minus = torch.func.grad(batch_loss)({k: theta[k] - eps * vec[k] for k in theta}, data.ids, data.mask)
        hv = hessian_vector_product(batch_loss, theta, data, vec)
        fd = torch.cat([((g_plus[k] - g_minus[k]) / (2 * eps)).flatten() for k in theta])
        exact = torch.cat([hv[k].flatten() for k in theta])
        assert ((fd - exact).norm() / exact.norm()).item() < 1e-3


def test_gamma_is_invariant_to_rescaling_one_samples_gradients():
    """§6: with a ratio at every term (final_norm), scaling g_n by c at every checkpoint keeps γ_n.
    The reference code's unit first denominator breaks this by exactly (c - 1) times its last term."""
    model = tiny_llama(seed=4)
    data = to_token_batch(random_samples(6, seed=5))
    with scoring_mode(model):
        theta, frozen = split_params(model)
        _, sample_loss = make_loss_fns(model, frozen)
        grads = []  # per-sample grads at 3 "checkpoints" plus the final one, flattened [N, P]
        for step in range(4):
            theta_t = {k: v + 0.05 * step * torch.randn_like(v) for k, v in theta.items()}
            g = per_sample_grads(sample_loss, theta_t, data)
            grads.append(torch.cat([v.flatten(1) for v in g.values()], dim=1).double())
    lams = torch.randn(3, grads[0].shape[1], dtype=torch.float64)

    def gamma(gs, final):
        dots = torch.stack([g @ lam for g, lam in zip(gs[:3], lams)])
        norms = torch.stack([g.norm(dim=1) for g in gs[:3]])
        return lqs_gamma(dots, norms, gs[3].norm(dim=1) if final else None, lr=0.008)

    c, n = 7.5, 2
    scaled = [g.clone() for g in grads]
    for g in scaled:
        g[n] *= c
    torch.testing.assert_close(gamma(scaled, True), gamma(grads, True), rtol=1e-10, atol=0)
    base, moved = gamma(grads, False), gamma(scaled, False)
    others = [i for i in range(6) if i != n]
    torch.testing.assert_close(moved[others], base[others])
    last_term = 0.008 * (grads[2][n] @ lams[2])
    assert moved[n].item() == pytest.approx((base[n] + (c - 1) * last_term).item(), rel=1e-9)


def naive_lqs(model, samples, target, steps, lr, batch_size, score_every, seed, names, final_norm):
    """Plain-autograd reference: every θ_t kept, per-sample loop, double-backward HVP, HF label loss."""
    base = dict(model.named_parameters())
    train = list(zip(samples["input_ids"], samples["labels_mask"]))
    tgt = list(zip(target["input_ids"], target["labels_mask"]))
    schedule = proxy_batch_schedule(len(train), batch_size, steps, seed)

    def loss(theta, rows):
        params = {**{k: v.detach() for k, v in base.items()}, **theta}
        return torch.stack([hf_sample_loss(model, i, m, params) for i, m in rows]).mean()

    def grad(theta, rows, create_graph=False):
        theta = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in theta.items()}
        gs = torch.autograd.grad(loss(theta, rows), list(theta.values()), create_graph=create_graph)
        return theta, dict(zip(theta, gs))

    thetas = [{k: base[k].detach().clone() for k in names}]
    for t in range(steps):
        _, g = grad(thetas[-1], [train[i] for i in schedule[t]])
        thetas.append({k: thetas[-1][k] - lr * g[k] for k in names})
    flat = lambda d: torch.cat([d[k].flatten() for k in names])  # noqa: E731
    lam = flat(grad(thetas[-1], tgt)[1])
    norms_at = lambda theta: torch.stack([flat(grad(theta, [r])[1]).norm() for r in train])  # noqa: E731
    dots, norms = {}, {}
    for t in range(steps - 1, -1, -1):
        if t % score_every == 0:
            gs = torch.stack([flat(grad(thetas[t], [r])[1]) for r in train])
            dots[t], norms[t] = gs @ lam, gs.norm(dim=1)
        gj = flat(grad(thetas[t], tgt)[1])
        theta, g = grad(thetas[t], [train[i] for i in schedule[t]], create_graph=True)
        lam_d = dict(zip(names, (p.reshape(theta[k].shape) for p, k in
                                 zip(lam.split([theta[k].numel() for k in names]), names))))
        hv = torch.autograd.grad(sum((g[k] * lam_d[k]).sum() for k in names), list(theta.values()))
        lam = (lam + gj - lr * torch.cat([h.flatten() for h in hv])).detach()
    scored = sorted(dots)
    gamma = torch.zeros(len(train), dtype=torch.float64)
    for j, t in enumerate(scored):
        if j + 1 < len(scored):
            denom = norms[scored[j + 1]]
        else:
            denom = norms_at(thetas[-1]) if final_norm else torch.ones(len(train), dtype=torch.float64)
        gamma += lr * dots[t] / denom
    return gamma.numpy()


@pytest.mark.parametrize("subset,final_norm", [(None, False), (["lm_head", "model.norm"], True)])
def test_lqs_scores_match_plain_autograd_reference(subset, final_norm):
    model = tiny_llama(seed=6, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    samples, target = random_samples(6, seed=7), random_samples(3, seed=8)
    kw = dict(steps=5, lr=0.5, batch_size=3, score_every=2, seed=11)
    result = lqs_scores(model, samples, target, params=subset, chunk_size=4, progress=False,
                        first_denominator="final_norm" if final_norm else "one", **kw)
    names = [n for n, _ in model.named_parameters() if subset is None or n.startswith(tuple(subset))]
    with scoring_mode(model):
        expected = naive_lqs(model, samples, target, names=names, final_norm=final_norm, **kw)
    assert result.scored_steps == [0, 2, 4]
    # float32-level agreement (Llama's RMSNorm runs in float32); a wrong sign, step or denominator
    # would be off by O(1).
    np.testing.assert_allclose(result.raw, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(result.scores, zscore_clip(expected), rtol=1e-4, atol=1e-5)
    assert result.metrics["lqs/trainable_params"] == sum(dict(model.named_parameters())[n].numel() for n in names)
    assert model.training  # restored
    for k, v in model.state_dict().items():  # the proxy run never touches the user's weights
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------- cheap scorers and the learned head

def test_loss_and_perplexity_scores_match_hf_loss():
    model = tiny_llama(seed=9)
    samples = random_samples(7, seed=10)
    scores = loss_scores(model, samples, batch_size=3, progress=False)
    with torch.no_grad():
        expected = [hf_sample_loss(model, i, m).item() for i, m in zip(samples["input_ids"], samples["labels_mask"])]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    np.testing.assert_allclose(perplexity_scores(model, samples, progress=False), np.exp(expected), rtol=1e-5)


def test_pass_rate_and_sample_validation():
    rewards = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [0.5, 1, 0, 0.5]])
    assert pass_rate_scores(rewards).tolist() == [0.75, 0.0, 0.5]
    with pytest.raises(ValueError, match="num_prompts, n"):
        pass_rate_scores([1.0, 0.0])
    samples = samples_from_prompt_lengths([([5, 6, 7, 8], 3), ([5, 6], 2)])
    assert samples["labels_mask"] == [[0, 0, 0, 1], [0, 0]]
    with pytest.raises(ValueError, match="sample 1 has no answer token"):  # prompt fills it: nothing to learn
        to_token_batch(samples)
    with pytest.raises(ValueError, match="sample 1 has no answer token"):
        to_token_batch({"input_ids": [[3, 4, 5], [3, 4, 5]], "labels_mask": [[0, 1, 1], [1, 0, 0]]})


def test_score_head_learns_a_synthetic_target():
    model = tiny_llama(seed=12)
    samples = random_samples(400, seed=13, lo=6, hi=16)
    # Learnable from mean-pooled states: the share of "low" tokens in the sample.
    target = np.array([np.mean(np.asarray(r) < 20) for r in samples["input_ids"]])
    feats = mean_pooled_features(model, samples, batch_size=64, progress=False)
    assert feats.shape == (400, 16)
    head, metrics = fit_score_head(feats[:300], target[:300], epochs=8, lr=1e-2, seed=0, progress=False)
    assert metrics["val_spearman"] == max(metrics["val_spearman_history"])
    held_out = predict_scores(head, feats[300:])
    assert spearman(held_out, target[300:]) > 0.3
