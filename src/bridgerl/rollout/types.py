"""Rollouts as a typed batch, and the Generator protocol every engine implements."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Rollouts:
    """S = prompts × n samples, grouped contiguously: rows [g*n, (g+1)*n) belong to prompt g.

    Prompts are left-padded and completions right-padded, so every completion starts at column P
    of the concatenation: log-probs of the completion are the last T+1 logits of one forward."""

    prompt_ids: torch.Tensor  # [S, P] long, left-padded
    prompt_mask: torch.Tensor  # [S, P] long
    completion_ids: torch.Tensor  # [S, T] long, right-padded with pad
    completion_mask: torch.Tensor  # [S, T] long, 1 up to and including EOS
    gen_logprobs: torch.Tensor  # [S, T] float, log π_generator(token) at temperature 1
    gen_entropy: torch.Tensor  # [S, T] float, entropy of π_generator at each step
    versions: torch.Tensor  # [S] long, generator weights version that produced each sample
    completions: list[str]  # S decoded completions (special tokens stripped)
    n: int  # samples per prompt
    sampled: bool = True  # False when rebuilt from stored tokens: gen_logprobs/gen_entropy are then zeros

    @property
    def num_groups(self) -> int:
        return self.prompt_ids.shape[0] // self.n

    @property
    def lengths(self) -> torch.Tensor:  # [S]
        return self.completion_mask.sum(dim=1)

    def select(self, rows: torch.Tensor, n: int | None = None) -> "Rollouts":
        """Rows by index (a copy), trimmed to the padding the chosen rows need."""
        rows = rows.to(self.prompt_ids.device)
        pm, cm = self.prompt_mask[rows], self.completion_mask[rows]
        p_keep = int(pm.sum(dim=1).max().item()) if len(rows) else 0
        t_keep = int(cm.sum(dim=1).max().item()) if len(rows) else 0
        P = pm.shape[1]
        return Rollouts(
            prompt_ids=self.prompt_ids[rows][:, P - p_keep :],
            prompt_mask=pm[:, P - p_keep :],
            completion_ids=self.completion_ids[rows][:, :t_keep],
            completion_mask=cm[:, :t_keep],
            gen_logprobs=self.gen_logprobs[rows][:, :t_keep],
            gen_entropy=self.gen_entropy[rows][:, :t_keep],
            versions=self.versions[rows],
            completions=[self.completions[i] for i in rows.tolist()],
            n=n if n is not None else self.n,
            sampled=self.sampled,
        )

    def to(self, device) -> "Rollouts":
        return Rollouts(**{f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                                    else getattr(self, f.name)) for f in fields(self)})


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Stack rollouts of different padded widths (prompts pad left, completions pad right)."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)

    def left(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Rollouts(
        prompt_ids=torch.cat([left(p.prompt_ids, P, pad_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, P, 0) for p in parts]),
        completion_ids=torch.cat([right(p.completion_ids, T, pad_id) for p in parts]),
        completion_mask=torch.cat([right(p.completion_mask, T, 0) for p in parts]),
        gen_logprobs=torch.cat([right(p.gen_logprobs, T, 0.0) for p in parts]),
        gen_entropy=torch.cat([right(p.gen_entropy, T, 0.0) for p in parts]),
        versions=torch.cat([p.versions for p in parts]),
        completions=[c for p in parts for c in p.completions],
        n=parts[0].n,
        sampled=all(p.sampled for p in parts),
    )


@runtime_checkable
class Generator(Protocol):
    """What every sampling engine implements (HF in-process, vLLM, vLLM server, a Ray worker pool)
    and what every caller uses. The engine holds its own copy of the weights; `version` is the
    policy step those weights come from, and every rollout it returns is tagged with it."""

    version: int

    def generate(self, prompts: list[list[int]], n: int, sampling, rng: torch.Generator | None = None) -> Rollouts:
        """n samples per prompt (token ids in), grouped contiguously, with the engine's per-token log-probs
        at temperature 1. `sampling` has temperature, top_p, top_k, max_new_tokens."""
        ...

    def load_weights(self, policy: torch.nn.Module, version: int) -> None:
        """Take the policy's current weights; afterwards `version == version`."""
        ...

    def score_tokens(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Log-prob of each token of each sequence given its prefix ([len - 1] per sequence), under the
        engine's current weights: the probe that checks a weight push landed (rollout/sync.py)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None:
        """Release processes, servers or devices the engine holds (a no-op in-process)."""
        ...


class Rewarder(Protocol):
    """Scores one sample per row, TRL-style: `rewards.RewardRouter` and the Ray reward workers."""

    def __call__(self, prompts: list, completions: list[str], rows: list[dict]) -> tuple[torch.Tensor, dict[str, float]]: ...


def sample_and_score(generator: Generator, rewarder: Rewarder, encode, rows: list[dict], n: int, sampling,
                     rng: torch.Generator | None, timer=None) -> tuple[Rollouts, torch.Tensor, dict[str, float]]:
    """n samples of each row's prompt and their rewards [len(rows)·n]: the generate → expand rows →
    reward step that training, OPTune's regeneration and pass-rate scoring share. `encode(row)` gives
    prompt ids; `rewarder(prompts, completions, rows)` follows rewards.RewardRouter; `timer(name)`, if
    given, times "generate" and "reward"."""
    timer = timer or (lambda name: nullcontext())
    with timer("generate"):
        rollouts = generator.generate([encode(r) for r in rows], n, sampling, rng)
    expanded = [r for r in rows for _ in range(n)]
    with timer("reward"):
        scores, metrics = rewarder([r["prompt"] for r in expanded], rollouts.completions, expanded)
    return rollouts, scores, metrics


def rollouts_from_tokens(prompts: list[list[int]], completions: list[list[int]], versions: list[int],
                         pad_id: int, n: int, texts: list[str] | None = None) -> Rollouts:
    """Rollouts rebuilt from stored token lists (e.g. OPTune's pair pool); no sampler statistics."""
    from ..data.encoding import pad

    S = len(prompts)
    prompt_ids, prompt_mask = pad(prompts, pad_id, "left")
    completion_ids, completion_mask = pad(completions, pad_id, "right")
    T = completion_ids.shape[1]
    zeros = torch.zeros((S, T))
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, zeros, zeros.clone(),
                    torch.tensor(versions, dtype=torch.long), texts or [""] * S, n, sampled=False)
