"""Rows → token ids: chat messages, prompt encoding, SFT samples, and the padding every batch uses."""
from __future__ import annotations

from typing import Any

import torch


def chat_messages(prompt: str | list[dict]) -> list[dict]:
    """A row's prompt as chat messages: conversational rows already are; text becomes one user turn."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Prompt ids through the tokenizer's chat template, ending with the assistant's turn opening."""
    return tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, return_dict=False)


class PromptEncoder:
    """`encode_prompt` with a cache by row id: a prompt revisited (offline, OPTune, epochs) is encoded once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[Any, list[int]] = {}

    def __call__(self, row: dict) -> list[int]:
        if row["id"] not in self.cache:
            self.cache[row["id"]] = encode_prompt(self.tokenizer, row["prompt"])
        return self.cache[row["id"]]


def encode_sft(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(prompt + completion + EOS token ids, prompt length) per row, truncated to max_length."""
    out = []
    for r in rows:
        prompt = encode_prompt(tokenizer, r["prompt"])
        completion = tokenizer.encode(r["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append(((prompt + completion)[:max_length], len(prompt)))
    return out


def target_text(row: dict) -> str | None:
    """A row's supervised target: its SFT completion, worked solution or gold answer, whichever it has."""
    return row.get("completion") or row.get("solution") or row.get("answer")


def answer_samples(tokenizer, rows: list[dict], max_length: int = 256) -> list[tuple[list[int], int]]:
    """(prompt + target tokens, prompt length) per row, the target from `target_text`."""
    targets = []
    for i, r in enumerate(rows):
        text = target_text(r)
        if not text:
            raise ValueError(f"row {i}: loss-based scoring needs a completion, solution or answer column")
        targets.append(dict(r, completion=str(text)))
    return encode_sft(tokenizer, targets, max_length)


def pad(seqs: list[list[int]], pad_id: int, side: str = "right", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids [S, W], attention mask [S, W]) padded on `side` ("left" or "right")."""
    width = max(1, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))
