"""Per-token log-probs of completions under a model, with each distinct prompt run once.

A GRPO group is n completions of one prompt (online DPO: chosen and rejected share theirs), and the
prompt is often longer than the completion. Rather than pushing prompt + completion through the
model for every row, the distinct prompts are prefilled once (with gradient, for the policy), their
KV cache is gathered out to the rows, and only the completions run on top of it. The result and its
gradient are those of the full forward: attention sees the same keys and values, and the gather's
backward sums each prompt's gradient over its rows.
"""
from __future__ import annotations

import time

import torch

from .types import Rollouts


def token_logprobs(model, batch: Rollouts, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """→ log π(token) [S, T] (zero on padding) and, if asked, the per-token entropy [S, T]."""
    first, inverse = distinct_prompts(batch)
    if len(first) * 2 <= len(inverse) and _can_share_prefix(model):
        logits = _shared_prefix_logits(model, batch, first, inverse)
    else:
        logits = _full_logits(model, batch)
    return _completion_logprobs(logits, batch, with_entropy)


def distinct_prompts(batch: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct prompt [U], distinct-prompt index of each row [S])."""
    ids = batch.prompt_ids.masked_fill(batch.prompt_mask == 0, -1)
    if ids.shape[0] == 0:
        return ids.new_zeros(0), ids.new_zeros(0)
    _, inverse = torch.unique(ids, dim=0, return_inverse=True)
    rows = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((int(inverse.max().item()) + 1,), len(inverse), device=inverse.device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def _can_share_prefix(model) -> bool:
    # Activation checkpointing turns the KV cache off in training forwards; fall back to the full one.
    # transformers 5 renamed the flag (reading the old name warns); PEFT wrappers forward either.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return not getattr(model, name)
        except AttributeError:
            continue
    return True


def _full_logits(model, batch: Rollouts) -> torch.Tensor:
    """Prompts are left-padded and completions right-padded, so the completion's logits are the
    last T+1 positions: `logits_to_keep` skips the LM head over the prompt."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    T = batch.completion_ids.shape[1]
    return model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                 logits_to_keep=T + 1, use_cache=False).logits[:, :-1]


def _shared_prefix_logits(model, batch: Rollouts, first: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Logits [S, T, V] predicting each completion token: the distinct prompts' last logit, then the
    completions (minus their last token) run against the prompts' cache, gathered to the rows."""
    p_mask = batch.prompt_mask[first]
    p_pos = (p_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=batch.prompt_ids[first], attention_mask=p_mask, position_ids=p_pos,
                use_cache=True, logits_to_keep=1)
    head = out.logits[:, -1:][inverse]  # [S, 1, V]: predicts completion token 0
    T = batch.completion_ids.shape[1]
    if T == 1:
        return head
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "batch_select_indices"):  # a model without a transformers Cache
        return _full_logits(model, batch)
    cache.batch_select_indices(inverse)
    start = p_mask.sum(dim=1)[inverse]  # the completion starts right after the real prompt tokens
    positions = start[:, None] + torch.arange(T - 1, device=start.device)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask[:, :-1]], dim=1)
    tail = model(input_ids=batch.completion_ids[:, :-1], attention_mask=mask, position_ids=positions,
                 past_key_values=cache, use_cache=True).logits
    return torch.cat([head, tail], dim=1)


def _completion_logprobs(logits: torch.Tensor, batch: Rollouts, with_entropy: bool):
    logp_all = logits.float().log_softmax(dim=-1)
    cmask = batch.completion_mask.to(logp_all.dtype)
    logps = logp_all.gather(2, batch.completion_ids[..., None]).squeeze(2) * cmask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1) * cmask
    return logps, entropy


def micro_batches(num_rows: int, lengths: torch.Tensor, size: int,
                  groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices in chunks of `size`, length-sorted so each chunk carries little padding.

    With `groups` (a prompt id per row), rows of one prompt stay together, so a chunk runs each of
    its prompts once (see token_logprobs); groups are ordered by their longest completion and rows
    by length within a group."""
    lengths = lengths.cpu()
    if groups is None:
        order = torch.argsort(lengths, stable=True)
    else:
        groups = groups.cpu()
        group_max = torch.zeros(int(groups.max()) + 1, dtype=lengths.dtype).scatter_reduce(
            0, groups, lengths, reduce="amax", include_self=False)
        # lexicographic (group's longest, group, own length) through stable sorts, last key first
        order = torch.argsort(lengths, stable=True)
        order = order[torch.argsort(groups[order], stable=True)]
        order = order[torch.argsort(group_max[groups[order]], stable=True)]
    return [order[i:i + size] for i in range(0, num_rows, size)]


def group_chunks(rows: torch.Tensor, lengths: torch.Tensor, micro_batch: int, n: int) -> list[torch.Tensor]:
    """Micro-batches (positions into `rows`, batch row indices g·n + i) keeping each group's rows together."""
    return micro_batches(len(rows), lengths, micro_batch, groups=rows.cpu() // n)


class ReferenceLogprobs:
    """The reference model's token log-probs of a step's rollout rows, each row computed at most once.

    GRPOVI's p and the objective's KL or DPO term ask for the same rows, so they share one forward.
    When the reference holds the very weights that sampled every row (`stand_in`), the sampler's own
    log-probs (recorded at temperature 1) are the answer and no forward runs."""

    def __init__(self, model: torch.nn.Module, rollouts: Rollouts, micro_batch: int, stand_in: bool):
        self.model, self.rollouts, self.micro_batch, self.stand_in = model, rollouts, micro_batch, stand_in
        self.values = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float32,
                                  device=rollouts.completion_ids.device)
        self.done = torch.zeros(rollouts.completion_ids.shape[0], dtype=torch.bool)
        self.seconds = 0.0  # forward time spent, for the step's time split

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [R] → log π_ref [R, T] (T the step's completion width; zero on padding)."""
        if self.stand_in:
            return self.rollouts.gen_logprobs[rows.to(self.rollouts.gen_logprobs.device)]
        rows_cpu = rows.cpu()
        todo = rows_cpu[~self.done[rows_cpu]]
        if todo.numel():
            start = time.perf_counter()
            sub = self.rollouts.select(todo)
            with torch.no_grad():
                for chunk in group_chunks(todo, sub.lengths, self.micro_batch, self.rollouts.n):
                    logps = token_logprobs(self.model, sub.select(chunk))[0]
                    self.values[todo[chunk].to(self.values.device), :logps.shape[1]] = logps.float()
            self.done[todo] = True
            self.seconds += time.perf_counter() - start
        return self.values[rows.to(self.values.device)]
