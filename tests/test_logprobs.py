"""Training log-probs: the shared-prompt forward against the full one, and group-keeping micro-batches."""
import torch

from bridgerl.config import SamplingConfig
from bridgerl.models import load_causal_lm
from bridgerl.rollout.hf import HFGenerator
from bridgerl.rollout import logprobs
from bridgerl.rollout.logprobs import distinct_prompts, micro_batches, token_logprobs


def sampled_batch(model, tokenizer, n=4):
    texts = ["What is 2+3?", "a", "Tom has 12 apples and buys 7 more. How many?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             return_dict=False) for t in texts]
    return HFGenerator(model, tokenizer).generate(prompts, n, SamplingConfig(max_new_tokens=12),
                                                  torch.Generator().manual_seed(0))


def test_shared_prompt_forward_equals_the_full_forward_in_values_and_gradients(tiny_model_dir, tokenizer):
    model = load_causal_lm(tiny_model_dir)
    batch = sampled_batch(model, tokenizer)
    first, inverse = distinct_prompts(batch)
    assert len(first) == 3 and len(inverse) == 12  # each prompt runs once on the shared path
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(1))

    def values_and_grads(path):
        model.zero_grad()
        logps = logprobs._completion_logprobs(path(), batch, with_entropy=False)[0]
        (logps * weights).sum().backward()
        return logps.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    shared, g_shared = values_and_grads(lambda: logprobs._shared_prefix_logits(model, batch, first, inverse))
    full, g_full = values_and_grads(lambda: logprobs._full_logits(model, batch))
    assert torch.allclose(shared, full, atol=1e-5)
    for name, g in g_full.items():
        assert torch.allclose(g_shared[name], g, rtol=1e-4, atol=1e-6), name
    lp, _ = token_logprobs(model, batch)  # the public entry point takes the shared path here
    assert torch.allclose(lp, full, atol=1e-5)


def test_micro_batches_keep_each_group_whole_and_cover_every_row_once():
    gen = torch.Generator().manual_seed(0)
    n, groups = 4, 7
    lengths = torch.randint(1, 30, (n * groups,), generator=gen)
    group_of = torch.arange(n * groups) // n
    chunks = micro_batches(n * groups, lengths, 8, groups=group_of)
    rows = torch.cat(chunks)
    assert sorted(rows.tolist()) == list(range(n * groups))
    for chunk in chunks:
        for g in group_of[chunk].unique():
            assert (group_of[chunk] == g).sum() == n  # a group never straddles two micro-batches
    longest = [int(lengths[group_of == g].max()) for g in group_of[rows].unique_consecutive()]
    assert longest == sorted(longest)  # groups ordered by their longest completion: little padding
