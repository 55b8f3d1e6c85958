"""Loss variants (algos/policy_loss.py) against their papers' formulas: GRPO unchanged, DAPO
clip-higher + token mean, Dr.GRPO's constant normaliser, GSPO's geometric-mean sequence ratio,
CISPO's detached clipped weight."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgerl.algos.grpo import group_advantages, grpo_loss
from bridgerl.algos.policy_loss import LOSSES, LossSettings, advantages, denominator, policy_loss
from bridgerl.config import ConfigError, GRPOConfig, load_config


def settings_for(loss: str, n: int = 4, max_new_tokens: int = 8, **algo) -> LossSettings:
    return LossSettings.from_config(GRPOConfig(loss=loss, **algo), n=n, max_new_tokens=max_new_tokens)


def score_grad(fn, logits):
    """∂fn/∂logits, for a loss built from log-probs of the first T vocabulary entries."""
    logits.grad = None
    fn(logits.log_softmax(-1)).backward()
    return logits.grad.clone()


def batch(seed=0, S=4, T=5, V=7, ragged=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, V, generator=g).requires_grad_(True)
    mask = torch.ones(S, T)
    if ragged:
        mask[0, 2:] = 0
        mask[2, 4:] = 0
    old = (logits.detach().log_softmax(-1)[:, :T] + 0.3 * torch.randn(S, T, generator=g))
    adv = torch.randn(S, generator=g)
    return logits, mask, old, adv


@pytest.mark.parametrize("importance", ["clip", "truncate"])
@pytest.mark.parametrize("aggregation", ["sum", "token_mean", "seq_mean"])
def test_default_loss_is_todays_grpo_exactly(importance, aggregation):
    logits, mask, old, adv = batch()
    s = settings_for("grpo", importance=importance, aggregation=aggregation, beta=0.01)
    ref = old - 0.1
    a, ma = policy_loss(logits.log_softmax(-1)[:, :5], old, adv, mask, s, ref_logps=ref)
    b, mb = grpo_loss(logits.log_softmax(-1)[:, :5], old, adv, mask, ref, beta=0.01, importance=importance,
                      aggregation=aggregation, n=4)
    assert a.item() == b.item() and ma == mb
    rewards = torch.randn(3, 4)
    assert torch.equal(advantages(rewards, s), group_advantages(rewards, True))


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_on_policy_gradient_is_advantage_times_score_aggregated(loss):
    logits, mask, _, adv = batch(1)
    s = settings_for(loss, aggregation="token_mean") if loss == "grpo" else settings_for(loss)
    got = score_grad(lambda lp: policy_loss(lp[:, :5], lp[:, :5].detach(), adv, mask, s)[0], logits)
    want = score_grad(lambda lp: -(adv[:, None] * lp[:, :5] * mask).sum() / mask.sum(), logits)
    assert torch.allclose(got, want, atol=1e-6)


def test_dapo_clip_higher_keeps_gradient_that_grpo_clips():
    logps = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[math.log(1 / 1.25)]])  # ratio 1.25: above 1.2, below 1.28
    one = torch.ones(1, 1)
    grpo, _ = policy_loss(logps, old, torch.tensor([1.0]), one, settings_for("grpo", aggregation="token_mean"))
    grpo.backward()
    assert logps.grad.item() == 0.0
    logps.grad = None
    dapo, m = policy_loss(logps, old, torch.tensor([1.0]), one, settings_for("dapo"))
    dapo.backward()
    assert math.isclose(logps.grad.item(), -1.25, rel_tol=1e-5) and m["ratio/clipped_frac"] == 0.0
    # The lower side is unchanged: ratio 0.75 < 0.8 with A < 0 is clipped in both.
    logps.grad = None
    low, m = policy_loss(logps, torch.tensor([[math.log(1 / 0.75)]]), torch.tensor([-1.0]), one, settings_for("dapo"))
    low.backward()
    assert logps.grad.item() == 0.0 and m["ratio/clipped_frac"] == 1.0


def test_dapo_config_fills_the_papers_clip_high_and_keeps_an_explicit_one():
    assert GRPOConfig(loss="dapo").clip_eps_high == 0.28
    assert GRPOConfig(loss="dapo", clip_eps_high=0.3).clip_eps_high == 0.3
    assert GRPOConfig().clip_eps_high is None and GRPOConfig().loss == "grpo"


def test_dr_grpo_advantages_are_centred_not_scaled():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 10.0, 0.0, 0.0]])
    adv = advantages(rewards, settings_for("dr_grpo"))
    assert torch.allclose(adv, rewards - rewards.mean(dim=1, keepdim=True))
    # normalize_std=true is ignored on purpose: Dr.GRPO is defined without it.
    assert torch.allclose(adv, advantages(rewards, settings_for("dr_grpo", normalize_std=True)))


def test_dr_grpo_scale_does_not_depend_on_the_batchs_token_count():
    """Per-token gradient is −A/(S·max_new_tokens) whatever the other sequences' lengths; DAPO's
    token mean is not (it divides by the tokens present)."""
    S, T = 3, 6
    logps = torch.zeros(S, T, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    grads = {}
    for loss in ("dr_grpo", "dapo"):
        for name, width in (("short", 2), ("long", 6)):
            mask = torch.zeros(S, T)
            mask[0] = 1
            mask[1:, :width] = 1
            logps.grad = None
            policy_loss(logps, logps.detach(), adv, mask, settings_for(loss, max_new_tokens=T))[0].backward()
            grads[loss, name] = logps.grad[0, 0].item()
    assert math.isclose(grads["dr_grpo", "short"], -1.0 / (S * T), rel_tol=1e-6)
    assert grads["dr_grpo", "short"] == grads["dr_grpo", "long"]
    assert not math.isclose(grads["dapo", "short"], grads["dapo", "long"])


def test_gspo_ratio_is_the_geometric_mean_and_length_invariant():
    token_ratios = torch.tensor([[1.1, 0.9, 1.3, 1.0]])
    logps = torch.zeros(1, 4)
    old = -token_ratios.log()
    s = settings_for("gspo", gspo_clip_eps=10.0, gspo_clip_eps_high=10.0)  # no clipping: see the raw ratio
    loss, m = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 4), s)
    geo = token_ratios.prod().item() ** (1 / 4)
    assert math.isclose(m["ratio/mean"], geo, rel_tol=1e-6) and math.isclose(-loss.item(), geo, rel_tol=1e-6)
    # The same tokens twice over: the product ratio squares, the geometric mean stays.
    twice, m2 = policy_loss(torch.zeros(1, 8), old.repeat(1, 2), torch.tensor([1.0]), torch.ones(1, 8), s)
    assert math.isclose(m2["ratio/mean"], geo, rel_tol=1e-6) and math.isclose(twice.item(), loss.item(), rel_tol=1e-6)


def test_gspo_on_policy_gradient_is_the_sequence_mean_score():
    logits, mask, _, adv = batch(2)
    got = score_grad(lambda lp: policy_loss(lp[:, :5], lp[:, :5].detach(), adv, mask, settings_for("gspo"))[0], logits)
    want = score_grad(lambda lp: -(adv * (lp[:, :5] * mask).sum(1) / mask.sum(1)).mean(), logits)
    assert torch.allclose(got, want, atol=1e-6)


def test_gspo_clips_whole_sequences_with_its_own_narrow_range():
    logps = torch.zeros(2, 3, requires_grad=True)
    old = torch.tensor([[-1e-3] * 3, [-1e-5] * 3])  # sequence ratios e^{1e-3} (outside 1 + 4e-4), e^{1e-5}
    loss, m = policy_loss(logps, old, torch.ones(2), torch.ones(2, 3), settings_for("gspo"))
    loss.backward()
    assert (logps.grad[0] == 0).all() and (logps.grad[1] != 0).all()
    assert m["ratio/clipped_frac"] == 0.5


def test_cispo_weight_is_clipped_and_detached():
    """Gradient = −sg(min(r, C))·A·∇log π / tokens: a token far outside the trust region still
    learns (PPO would zero it), with its weight capped at C, and the weight itself has no gradient."""
    logps = torch.zeros(1, 3, requires_grad=True)
    ratios = torch.tensor([[0.5, 1.5, 4.0]])
    adv = torch.tensor([2.0])
    loss, m = policy_loss(logps, -ratios.log(), adv, torch.ones(1, 3), settings_for("cispo", truncate_max=2.0))
    loss.backward()
    w = ratios.clamp(max=2.0)
    assert torch.allclose(logps.grad, -w * 2.0 / 3, atol=1e-6)
    assert math.isclose(m["ratio/clipped_frac"], 1 / 3, rel_tol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_micro_batches_add_up_to_the_full_batch(loss):
    logits, mask, old, adv = batch(3, S=6)
    s = settings_for(loss, n=3)
    full = denominator(mask, s)
    whole, _ = policy_loss(logits.log_softmax(-1)[:, :5], old, adv, mask, s, normalizer=full)
    alone, _ = policy_loss(logits.log_softmax(-1)[:, :5], old, adv, mask, s)
    parts = sum(policy_loss(logits.log_softmax(-1)[i:i + 3, :5], old[i:i + 3], adv[i:i + 3], mask[i:i + 3], s,
                            normalizer=full)[0] for i in (0, 3))
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(whole, alone, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_token_weight_removes_a_sequences_gradient(loss):
    logits, mask, old, adv = batch(4)
    weights = torch.ones_like(mask)
    weights[1] = 0
    s = settings_for(loss)
    grad = score_grad(lambda lp: policy_loss(lp[:, :5], old, adv, mask, s, token_weights=weights)[0], logits)
    assert (grad[1] == 0).all() and (grad[0] != 0).any()


@given(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8), st.sampled_from(LOSSES))
@settings(max_examples=40, deadline=None)
def test_equal_rewards_give_zero_advantage_and_loss_for_every_variant(values, loss):
    rewards = torch.tensor([values[:4], [values[4]] * 4])
    s = settings_for(loss)
    adv = advantages(rewards, s)
    # a group's advantages sum to 0 up to float32 rounding of r − mean, which dividing by a small std
    # amplifies (found by hypothesis: [0.625, 0.625, 0.625, 0.6396] sums to 1.6e-5)
    std = rewards[0].std().item() if s.normalize_std and loss != "dr_grpo" else 1.0
    rounding = 8 * len(values[:4]) * torch.finfo(torch.float32).eps * max(values[:4]) / (std + 1e-6)
    assert torch.allclose(adv[1], torch.zeros(4)) and torch.allclose(adv[0].sum(), torch.tensor(0.0),
                                                                      atol=1e-5 + rounding)


def test_variant_config_refuses_knobs_it_would_ignore():
    base = ["model.path=x", "algo.name=grpo"]
    with pytest.raises(ConfigError, match="aggregation"):
        load_config(None, base + ["algo.loss=dapo", "algo.aggregation=seq_mean"])
    with pytest.raises(ConfigError, match="importance"):
        load_config(None, base + ["algo.loss=gspo", "algo.importance=truncate"])
    with pytest.raises(ConfigError, match="truncate_max"):
        load_config(None, base + ["algo.loss=cispo", "algo.clip_eps_high=0.3"])
    with pytest.raises(ConfigError, match="'cispo'"):
        load_config(None, base + ["algo.loss=ppo"])
    assert load_config(None, base + ["algo.loss=dr_grpo"]).algo.loss == "dr_grpo"
