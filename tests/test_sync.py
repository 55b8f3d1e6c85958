"""rollout/sync.py: a weight push is checked, and a broken push stops with its reason (HF engine)."""
import time

import pytest
import torch

from bridgerl.models import load_causal_lm, make_tiny_model
from bridgerl.rollout.hf import HFGenerator
from bridgerl.rollout.sync import WeightSyncError, probe_sequences, push_weights


@pytest.fixture()
def policy_and_generator(tiny_model_dir, tokenizer):
    policy = load_causal_lm(tiny_model_dir)
    generator = HFGenerator(policy, tokenizer)
    with torch.no_grad():  # one "training step": the generator now holds stale weights
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, generator


def probe_for(policy):
    return probe_sequences(policy.config.vocab_size)


def test_probe_is_fixed_and_in_range():
    a, b = probe_sequences(100), probe_sequences(100)
    assert a == b and len({len(s) for s in a}) == len(a)
    assert all(2 <= t < 100 for s in a for t in s)


def test_push_lands_and_reports_a_tiny_gap(policy_and_generator):
    policy, generator = policy_and_generator
    m = push_weights(generator, policy, version=3, timeout_s=30, probe=probe_for(policy))
    assert generator.version == 3
    assert m["sync/max_logprob_diff"] < 1e-5
    assert m["time/sync_verified"] >= m["time/sync_push"] > 0


def test_push_in_train_mode_probes_without_dropout(tiny_model_dir, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.attention_dropout = 0.5  # dropout in the policy's training mode must not reach the probe
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=cfg).train()
    generator = HFGenerator(policy, tokenizer)
    m = push_weights(generator, policy, version=1, timeout_s=30, probe=probe_for(policy))
    assert m["sync/max_logprob_diff"] < 1e-5 and policy.training


class NoOpPush(HFGenerator):
    """A push that claims success but copies nothing: the generator stays stale."""

    def load_weights(self, policy, version):
        self.version = version


class SlowPush(HFGenerator):
    def load_weights(self, policy, version):
        time.sleep(5)
        super().load_weights(policy, version)


class TruncatedProbe(HFGenerator):
    def score_tokens(self, sequences):
        return [t[:-1] for t in super().score_tokens(sequences)]


def rebuild(cls, generator, policy, tokenizer):
    g = cls(policy, tokenizer)
    g.model.load_state_dict(generator.model.state_dict())  # the stale weights
    return g


def test_stale_generator_is_caught(policy_and_generator, tokenizer):
    policy, generator = policy_and_generator
    stale = rebuild(NoOpPush, generator, policy, tokenizer)
    with pytest.raises(WeightSyncError, match="stale or wrong weights"):
        push_weights(stale, policy, version=1, timeout_s=30, probe=probe_for(policy))


def test_hung_push_times_out(policy_and_generator, tokenizer):
    policy, generator = policy_and_generator
    slow = rebuild(SlowPush, generator, policy, tokenizer)
    start = time.perf_counter()
    with pytest.raises(WeightSyncError, match="sync_timeout_s"):
        push_weights(slow, policy, version=1, timeout_s=0.5, probe=probe_for(policy))
    assert time.perf_counter() - start < 3


def test_wrong_shapes_are_refused(policy_and_generator, tokenizer, tmp_path):
    policy, generator = policy_and_generator
    other = load_causal_lm(str(make_tiny_model(tmp_path / "mini", "llama", "mini", tokenizer=tokenizer)))
    with pytest.raises(WeightSyncError, match="weight push to HFGenerator failed"):
        push_weights(generator, other, version=1, timeout_s=30, probe=probe_for(other))


def test_broken_probe_shape_is_refused(policy_and_generator, tokenizer):
    policy, generator = policy_and_generator
    broken = rebuild(TruncatedProbe, generator, policy, tokenizer)
    with pytest.raises(WeightSyncError, match="shapes"):
        push_weights(broken, policy, version=1, timeout_s=30, probe=probe_for(policy))
