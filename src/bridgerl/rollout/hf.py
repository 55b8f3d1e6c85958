"""The Hugging Face sampling engine: batched, left-padded, KV-cached, one prefill per prompt.

Each prompt is prefilled once and its cache repeated n times; rows that emit EOS leave the batch
(their cache rows are dropped), so a step costs the tokens actually generated."""
from __future__ import annotations

import torch

from ..data.encoding import pad
from ..models import copy_weights_, frozen_copy
from .decode import FastDecode, HFDecode, fast_decode_supported
from .types import Rollouts, concat_rollouts


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                  rng: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float → token ids [B]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already exceeds top_p (the top token always stays).
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF draw: one uniform per row. torch.multinomial draws an exponential per vocabulary
    # entry, which on CPU costs more than the decode step of a small model. A zero-probability token
    # is a flat step of the CDF, so it can never be picked.
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    u = torch.rand((cdf.shape[0], 1), generator=rng, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(1)


class HFGenerator:
    """Samples from its own copy of the policy weights; `version` says which policy step they are."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 256, share_weights: bool = False,
                 fast_decode: bool = True):
        # share_weights=True samples straight from the given module (used for evaluation).
        # fast_decode=False always decodes through the model's own forward (rollout/decode.py).
        self.fast_decode = fast_decode
        self.model = model if share_weights else frozen_copy(model)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.version = 0
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = torch.tensor(sorted(_eos_ids(model, tokenizer)), dtype=torch.long)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def load_weights(self, policy: torch.nn.Module, version: int) -> None:
        copy_weights_(self.model, policy)
        self.version = version

    @torch.no_grad()
    def score_tokens(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return sequence_token_logprobs(self.model, sequences, self.pad_id)

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"version": self.version, "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.version = state["version"]

    def generate(self, prompts: list[list[int]], n: int, sampling, rng: torch.Generator | None = None) -> Rollouts:
        per_call = max(1, self.batch_size // n)
        parts = [self._generate(prompts[i:i + per_call], n, sampling, rng) for i in range(0, len(prompts), per_call)]
        return concat_rollouts(parts, self.pad_id)

    @torch.no_grad()  # not inference_mode: rollout tensors feed the autograd graph of the update
    def _generate(self, prompts: list[list[int]], n: int, sampling, rng) -> Rollouts:
        model, device = self.model, self.device
        was_training = model.training
        model.eval()
        prompt_ids, prompt_mask = pad(prompts, self.pad_id, "left", device)
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1)
        S, T = len(prompts) * n, sampling.max_new_tokens
        cache = out.past_key_values
        if self.fast_decode and fast_decode_supported(model):
            decoder = FastDecode(model, cache, prompt_mask, T, repeat=n)
        else:
            cache.batch_repeat_interleave(n)
            decoder = HFDecode(model, cache, prompt_mask.repeat_interleave(n, dim=0))
        logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
        next_pos = positions[:, -1].repeat_interleave(n, dim=0) + 1
        tokens = torch.full((S, T), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((S, T), dtype=torch.float32, device=device)
        entropy = torch.zeros((S, T), dtype=torch.float32, device=device)
        lengths = torch.full((S,), T, dtype=torch.long, device=device)
        alive = torch.arange(S, device=device)  # rows still generating, in cache order
        eos = self.eos_ids.to(device)
        for t in range(T):
            tok = sample_tokens(logits, sampling.temperature, sampling.top_p, sampling.top_k, rng)
            tokens[alive, t] = tok
            logp_all = logits.log_softmax(dim=-1)
            logps[alive, t] = logp_all.gather(1, tok[:, None]).squeeze(1)
            entropy[alive, t] = -(logp_all.exp() * logp_all).sum(dim=-1)
            done = torch.isin(tok, eos)
            if t == T - 1:
                break
            if done.any():
                lengths[alive[done]] = t + 1
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                alive, tok, next_pos = alive[keep], tok[keep], next_pos[keep]
                decoder.keep(keep)
            logits = decoder.step(tok, next_pos)
            next_pos = next_pos + 1
        model.train(was_training)

        completion_mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()
        width = int(lengths.max().item())
        completion_mask, tokens = completion_mask[:, :width], tokens[:, :width]
        logps, entropy = logps[:, :width] * completion_mask, entropy[:, :width] * completion_mask
        texts = self.tokenizer.batch_decode(tokens.masked_fill(completion_mask == 0, self.pad_id).cpu().tolist(),
                                            skip_special_tokens=True)
        return Rollouts(
            prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            completion_ids=tokens,
            completion_mask=completion_mask,
            gen_logprobs=logps,
            gen_entropy=entropy,
            versions=torch.full((S,), self.version, dtype=torch.long, device=device),
            completions=texts,
            n=n,
        )


@torch.no_grad()
def sequence_token_logprobs(model: torch.nn.Module, sequences: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """log π(token_t | tokens_<t) for t ≥ 1 of each sequence, as float32 CPU tensors [len - 1]."""
    device = next(model.parameters()).device
    ids, mask = pad(sequences, pad_id, "left", device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
    logps = logits[:, :-1].log_softmax(dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    width = ids.shape[1]
    return [logps[i, width - len(s):].cpu() for i, s in enumerate(sequences)]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
    return {i for i in ids if i is not None}
