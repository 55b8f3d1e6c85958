"""The in-process vLLM engine against bridgerl's HF engine and the policy's own forward."""
import pytest
import torch

from bridgerl.config import SamplingConfig
from bridgerl.models import load_causal_lm, make_tiny_model
from bridgerl.rollout.hf import HFGenerator, sequence_token_logprobs
from bridgerl.rollout.sync import WeightSyncError, policy_logprobs, probe_sequences, push_weights

PROMPTS = ["1 + 2 =", "the apples and", "how many books", "7 * 3 - 4 ="]


def encode(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


def teacher_forced(policy, rollouts) -> torch.Tensor:
    """The policy's log-probs of each sampled completion token [S, T] (zeros past the mask)."""
    seqs, spans = [], []
    for i in range(rollouts.prompt_ids.shape[0]):
        p = rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()].tolist()
        c = rollouts.completion_ids[i][rollouts.completion_mask[i].bool()].tolist()
        seqs.append(p + c)
        spans.append(len(c))
    out = torch.zeros_like(rollouts.gen_logprobs)
    for i, lp in enumerate(policy_logprobs(policy, seqs)):
        if spans[i]:
            out[i, :spans[i]] = lp[-spans[i]:]
    return out


def perturb_(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_greedy_outputs_equal_the_hf_engine(engine, policy, tokenizer):
    push_weights(engine, policy, 0, 60, probe_sequences(policy.config.vocab_size))
    sampling = SamplingConfig(temperature=0, max_new_tokens=16)
    a = engine.generate(encode(tokenizer), 2, sampling)
    b = HFGenerator(policy, tokenizer).generate(encode(tokenizer), 2, sampling)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert a.completions == b.completions
    assert (a.gen_logprobs - b.gen_logprobs).abs().max() < 1e-4
    assert a.n == 2 and a.num_groups == len(PROMPTS)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_sampled_logprobs_are_the_policys_raw_t1_logprobs(engine, tokenizer, eos_model_dir, temperature, top_k, top_p):
    """Recorded log-probs are log π(token) at temperature 1 without top-k/top-p (logprobs_mode=raw_logprobs),
    whatever the sampling settings, and completions end at EOS with the EOS inside the mask."""
    policy = load_causal_lm(eos_model_dir)
    push_weights(engine, policy, 5, 60, probe_sequences(policy.config.vocab_size))
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=16)
    r = engine.generate(encode(tokenizer), 8, sampling, torch.Generator().manual_seed(1))
    assert r.completion_ids.shape[0] == 8 * len(PROMPTS)
    assert (r.versions == 5).all()
    mask = r.completion_mask.bool()
    want = teacher_forced(policy, r)
    assert (r.gen_logprobs - want)[mask].abs().max() < 1e-4
    assert (r.gen_logprobs[~mask] == 0).all() and (r.gen_entropy == 0).all() and not engine.reports_entropy
    eos = tokenizer.eos_token_id
    lengths = r.lengths
    ended = lengths < 16
    assert ended.any(), "the EOS-prone model should end some rows with EOS"
    for i in ended.nonzero().squeeze(1).tolist():
        assert r.completion_ids[i, lengths[i] - 1] == eos
        assert (r.completion_ids[i, :lengths[i] - 1] != eos).all()
    # Samples differ; a fixed rng repeats the batch.
    assert len({tuple(row.tolist()) for row in r.completion_ids}) > len(PROMPTS)
    again = engine.generate(encode(tokenizer), 8, sampling, torch.Generator().manual_seed(1))
    assert torch.equal(again.completion_ids, r.completion_ids)


def test_after_a_push_outputs_change_and_logprobs_match_the_new_policy(engine, policy, tokenizer):
    """Fails without the tied-lm_head re-pack in vllm_worker (the log-probs are then off by nats)."""
    probe = probe_sequences(policy.config.vocab_size)
    push_weights(engine, policy, 0, 60, probe)
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    before = engine.generate(encode(tokenizer), 2, greedy)
    perturb_(policy, 0.1)
    m = push_weights(engine, policy, 1, 60, probe)
    assert m["sync/max_logprob_diff"] < 1e-4 and engine.version == 1
    after = engine.generate(encode(tokenizer), 2, greedy)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, HFGenerator(policy, tokenizer).generate(encode(tokenizer), 2, greedy).completion_ids)
    sampled = engine.generate(encode(tokenizer), 4, SamplingConfig(max_new_tokens=12), torch.Generator().manual_seed(2))
    mask = sampled.completion_mask.bool()
    assert (sampled.gen_logprobs - teacher_forced(policy, sampled))[mask].abs().max() < 1e-4
    assert (sampled.versions == 1).all()


def test_the_tied_lm_head_fix_is_needed_in_this_vllm(engine, policy):
    """Without re-packing the tied lm_head the probe catches the stale head. If this test fails, vLLM
    fixed the bug upstream and the work-around in vllm_worker can go."""
    probe = probe_sequences(policy.config.vocab_size)
    push_weights(engine, policy, 0, 60, probe)
    perturb_(policy, 0.1, seed=3)
    engine.fix_tied_lm_head = False
    try:
        with pytest.raises(WeightSyncError, match="stale or wrong weights") as err:
            push_weights(engine, policy, 1, 60, probe)
        assert "differ from the policy's by up to" in str(err.value)
    finally:
        engine.fix_tied_lm_head = True
    push_weights(engine, policy, 1, 60, probe)  # with the fix the same push lands


def test_pushing_weights_of_the_wrong_shapes_stops_with_a_clear_error(engine, policy, tokenizer, tmp_path):
    other = load_causal_lm(str(make_tiny_model(tmp_path / "small", "llama", "small", tokenizer=tokenizer)))
    with pytest.raises(WeightSyncError, match="has shape .* but the engine's model has"):
        push_weights(engine, other, 1, 60, probe_sequences(other.config.vocab_size))
    push_weights(engine, policy, 0, 60, probe_sequences(policy.config.vocab_size))  # the engine recovers


def test_score_tokens_equals_the_policy_forward(engine, policy):
    push_weights(engine, policy, 0, 60, probe_sequences(policy.config.vocab_size))
    seqs = [[5, 9, 30, 200, 17], [40, 41, 42], list(range(3, 60))]
    got = engine.score_tokens(seqs)
    want = sequence_token_logprobs(policy.eval(), seqs, pad_id=0)
    for g, w, s in zip(got, want, seqs):
        assert g.shape == (len(s) - 1,) and (g - w).abs().max() < 1e-4


def test_state_dict_restores_the_pushed_weights(engine, policy):
    probe = probe_sequences(policy.config.vocab_size)
    perturb_(policy, 0.1, seed=4)
    push_weights(engine, policy, 7, 60, probe)
    state = engine.state_dict()
    want = policy_logprobs(policy, probe)
    fresh = load_causal_lm(engine.model_path)
    push_weights(engine, fresh, 0, 60, probe)  # the engine moves away...
    engine.load_state_dict(state)  # ...and a checkpoint brings it back
    assert engine.version == 7
    got = engine.score_tokens(probe)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-4


def test_a_lora_policy_is_pushed_merged(engine, policy):
    from bridgerl.models import apply_lora

    lora = apply_lora(policy, 4, 8, 0.0, "all-linear")
    with torch.no_grad():  # B starts at zero; give the adapter an effect
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    m = push_weights(engine, lora, 2, 60, probe_sequences(policy.config.vocab_size))
    assert m["sync/max_logprob_diff"] < 1e-4
    assert not any("lora" in k for k in engine.state_dict()["weights"])


def test_a_head_size_vllm_cpu_cannot_run_is_refused_before_start(tokenizer, tmp_path):
    from bridgerl.config import VLLMEngineConfig
    from bridgerl.rollout.vllm import VLLMGenerator

    micro = make_tiny_model(tmp_path / "micro", "llama", "micro", tokenizer=tokenizer)  # head_dim 24
    with pytest.raises(ValueError, match="has 24"):
        VLLMGenerator(str(micro), tokenizer, VLLMEngineConfig())
