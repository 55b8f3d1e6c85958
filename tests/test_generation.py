"""The HF sampling engine against transformers' own generate and a full forward."""
import pytest
import torch

from bridgerl.config import SamplingConfig
from bridgerl.models import copy_weights_, load_causal_lm
from bridgerl.rollout.hf import HFGenerator, sample_tokens
from bridgerl.rollout.logprobs import token_logprobs


def prompts_for(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          return_dict=False) for t in texts]


def test_greedy_matches_transformers_generate_with_left_padding(tiny_model_dir, tokenizer):
    model = load_causal_lm(tiny_model_dir)
    prompts = prompts_for(tokenizer, ["What is 2+3?", "Tom has 12 apples and buys 7 more. How many?"])
    gen = HFGenerator(model, tokenizer)
    out = gen.generate(prompts, 1, SamplingConfig(temperature=0, max_new_tokens=12))
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (ids != tokenizer.pad_token_id).long()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[:, width:]
    for row in range(2):
        length = int(out.completion_mask[row].sum())
        assert out.completion_ids[row, :length].tolist() == ref[row, :length].tolist()


def test_sampler_logprobs_equal_a_full_forward_and_rows_stop_at_eos(tiny_model_dir, tokenizer):
    model = load_causal_lm(tiny_model_dir)
    gen = HFGenerator(model, tokenizer)
    prompts = prompts_for(tokenizer, ["a", "what is 1 + 1 ?", "hello there"])
    out = gen.generate(prompts, 4, SamplingConfig(max_new_tokens=16), torch.Generator().manual_seed(0))
    assert out.prompt_ids.shape[0] == 12 and out.n == 4
    with torch.no_grad():
        lp, ent = token_logprobs(model, out, with_entropy=True)
    assert torch.allclose(lp, out.gen_logprobs, atol=1e-4)
    assert torch.allclose(ent, out.gen_entropy, atol=1e-3)
    eos = tokenizer.eos_token_id
    for row in range(12):
        length = int(out.completion_mask[row].sum())
        toks = out.completion_ids[row, :length].tolist()
        assert eos not in toks[:-1]  # nothing generated after EOS
        assert length == 16 or toks[-1] == eos
        assert (out.completion_ids[row, length:] == tokenizer.pad_token_id).all()


def test_sampling_is_seeded_and_weights_are_a_separate_copy(tiny_model_dir, tokenizer):
    model = load_causal_lm(tiny_model_dir)
    gen = HFGenerator(model, tokenizer)
    prompts = prompts_for(tokenizer, ["seed test"])
    cfg = SamplingConfig(max_new_tokens=8, top_k=20, top_p=0.9)
    a = gen.generate(prompts, 3, cfg, torch.Generator().manual_seed(3))
    b = gen.generate(prompts, 3, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a.completion_ids, b.completion_ids)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(next(gen.model.parameters()), next(model.parameters()))
    gen.load_weights(model, version=5)
    assert gen.version == 5 and torch.equal(next(gen.model.parameters()), next(model.parameters()))


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(2000, 1)
    rng = torch.Generator().manual_seed(0)
    assert set(sample_tokens(logits, 1.0, 1.0, 2, rng).tolist()) <= {0, 1}
    probs = logits[0].softmax(-1)
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(sample_tokens(logits, 1.0, 0.8, 0, rng).tolist()) == {0, 1}
    assert set(sample_tokens(logits, 0.0, 1.0, 0, rng).tolist()) == {0}


def test_copy_weights_in_place_keeps_storage(tiny_model_dir):
    a, b = load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(0.5)
    ptr = next(a.parameters()).data_ptr()
    copy_weights_(a, b)
    assert next(a.parameters()).data_ptr() == ptr
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_decode_step_equals_the_transformers_forward(arch):
    """Left-padded prompts, each repeated for its samples, rows leaving the batch midway."""
    from transformers import AutoModelForCausalLM

    from bridgerl.models import tiny_config
    from bridgerl.rollout.decode import FastDecode, HFDecode, fast_decode_supported

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, "micro")).eval()
    assert fast_decode_supported(model)
    U, n, P, T = 3, 2, 7, 6
    ids = torch.randint(2, 500, (U, P))
    mask = torch.ones(U, P, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        prefill = [model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
                   for _ in range(2)]
        fast = FastDecode(model, prefill[0].past_key_values, mask, T, repeat=n)
        cache = prefill[1].past_key_values
        cache.batch_repeat_interleave(n)
        slow = HFDecode(model, cache, mask.repeat_interleave(n, 0))
        positions = pos[:, -1].repeat_interleave(n) + 1
        tok = torch.randint(2, 500, (U * n,))
        for t in range(T - 1):
            if t == 2:
                keep = torch.tensor([0, 2, 3, 5])
                fast.keep(keep), slow.keep(keep)
                tok, positions = tok[keep], positions[keep]
            assert torch.allclose(fast.step(tok, positions), slow.step(tok, positions), atol=1e-5)
            tok, positions = torch.randint(2, 500, (len(tok),)), positions + 1


def test_fast_decode_samples_what_the_transformers_path_samples(tiny_model_dir, tokenizer):
    from bridgerl.rollout.decode import fast_decode_supported

    model = load_causal_lm(tiny_model_dir)
    prompts = prompts_for(tokenizer, ["What is 2+3?", "a", "Tom has 12 apples and buys 7 more. How many?"])
    fast, slow = HFGenerator(model, tokenizer), HFGenerator(model, tokenizer, fast_decode=False)
    assert fast_decode_supported(fast.model)
    cfg = SamplingConfig(temperature=0, max_new_tokens=16)
    a, b = fast.generate(prompts, 2, cfg), slow.generate(prompts, 2, cfg)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.gen_logprobs, b.gen_logprobs, atol=1e-5)


def test_models_outside_the_fast_path_fall_back_to_transformers(tokenizer):
    from transformers import AutoModelForCausalLM

    from bridgerl.models import tiny_config
    from bridgerl.rollout.decode import fast_decode_supported

    moe = AutoModelForCausalLM.from_config(tiny_config("olmoe", "nano"))
    assert not fast_decode_supported(moe)
    dense = AutoModelForCausalLM.from_config(tiny_config("llama", "nano"))
    from peft import LoraConfig, get_peft_model

    assert not fast_decode_supported(get_peft_model(dense, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    gen = HFGenerator(moe, tokenizer)
    out = gen.generate(prompts_for(tokenizer, ["hi"]), 2, SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0))
    assert out.completion_ids.shape[0] == 2
