"""rollout.engine=vllm_server: a real vLLM OpenAI-compatible server on 127.0.0.1, started and stopped by pid."""
import pytest
import torch

from bridgerl.config import SamplingConfig
from bridgerl.models import load_causal_lm, make_tiny_model
from bridgerl.rollout.hf import HFGenerator
from bridgerl.rollout.sync import WeightSyncError, probe_sequences, push_weights
from bridgerl.rollout.vllm_server import ServerError, VLLMServerGenerator

from .conftest import Server
from .test_engine import PROMPTS, encode, perturb_, teacher_forced


def test_server_greedy_equals_hf_and_sampled_logprobs_equal_the_policy(server, model_dir, policy, tokenizer):
    g = VLLMServerGenerator(server.url, tokenizer, model_path=model_dir)
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    a = g.generate(encode(tokenizer), 2, greedy)
    b = HFGenerator(policy, tokenizer).generate(encode(tokenizer), 2, greedy)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completions == b.completions
    assert (a.gen_logprobs - b.gen_logprobs).abs().max() < 1e-4
    r = g.generate(encode(tokenizer), 4, SamplingConfig(max_new_tokens=12), torch.Generator().manual_seed(0))
    assert r.completion_ids.shape[0] == 4 * len(PROMPTS)
    mask = r.completion_mask.bool()
    assert (r.gen_logprobs - teacher_forced(policy, r))[mask].abs().max() < 1e-4


@pytest.mark.parametrize("via_file", [False, True])
def test_server_push_lands_and_changes_outputs(server, model_dir, policy, tokenizer, tmp_path, via_file):
    g = VLLMServerGenerator(server.url, tokenizer, model_path=model_dir,
                            weights_dir=str(tmp_path / "push") if via_file else None)
    probe = probe_sequences(policy.config.vocab_size)
    push_weights(g, policy, 0, 120, probe)
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    before = g.generate(encode(tokenizer), 2, greedy)
    perturb_(policy, 0.1, seed=11)
    m = push_weights(g, policy, 3, 120, probe)
    assert m["sync/max_logprob_diff"] < 1e-4 and g.version == 3
    after = g.generate(encode(tokenizer), 2, greedy)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert (after.versions == 3).all()
    sampled = g.generate(encode(tokenizer), 4, SamplingConfig(max_new_tokens=12), torch.Generator().manual_seed(1))
    mask = sampled.completion_mask.bool()
    assert (sampled.gen_logprobs - teacher_forced(policy, sampled))[mask].abs().max() < 1e-4


def test_server_refuses_weights_of_the_wrong_shapes(server, model_dir, tokenizer, tmp_path):
    g = VLLMServerGenerator(server.url, tokenizer, model_path=model_dir)
    other = load_causal_lm(str(make_tiny_model(tmp_path / "small", "llama", "small", tokenizer=tokenizer)))
    with pytest.raises(WeightSyncError, match="has shape .* but the engine's model has"):
        push_weights(g, other, 1, 60, probe_sequences(other.config.vocab_size))


def test_a_killed_server_stops_the_push_with_a_clear_error(model_dir, policy, tokenizer, tmp_path):
    own = Server(model_dir, tmp_path / "server.log")  # not the shared one: this test kills it
    try:
        g = VLLMServerGenerator(own.url, tokenizer, model_path=model_dir)
        probe = probe_sequences(policy.config.vocab_size)
        push_weights(g, policy, 1, 60, probe)
    finally:
        own.stop()
    assert own.proc.poll() is not None
    with pytest.raises(WeightSyncError, match="unreachable"):
        push_weights(g, policy, 2, 60, probe)
    assert g.version == 1  # never claims weights it does not hold
    with pytest.raises(ServerError, match="unreachable"):
        VLLMServerGenerator(own.url, tokenizer)
