"""Per-token log-probs of completions under a model: one forward, logits for the completion only."""
from __future__ import annotations

import torch

from ..rollout.types import Rollouts


def token_logprobs(model, batch: Rollouts, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """→ log π(token) [S, T] (zero on padding) and, if asked, the per-token entropy [S, T].

    Prompts are left-padded and completions right-padded, so the completion's logits are the last
    T+1 positions: `logits_to_keep` skips the LM head (and the float copy) over the prompt."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    T = batch.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=T + 1, use_cache=False).logits[:, :-1].float()
    logp_all = logits.log_softmax(dim=-1)
    cmask = batch.completion_mask.to(logp_all.dtype)
    logps = logp_all.gather(2, batch.completion_ids[..., None]).squeeze(2) * cmask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1) * cmask
    return logps, entropy


def micro_batches(num_rows: int, lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices in chunks of `size`, length-sorted so each chunk carries little padding."""
    order = torch.argsort(lengths.cpu(), stable=True)
    return [order[i:i + size] for i in range(0, num_rows, size)]
