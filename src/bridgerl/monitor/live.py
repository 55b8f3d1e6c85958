"""Pathway monitors (algorithms.md §5) during training: a fixed probe set measured every k steps."""
from __future__ import annotations

import torch

from ..data.encoding import answer_samples, encode_prompt, pad, target_text
from .pathways import PathwayMonitor


def probe_from_rows(tokenizer, rows: list[dict], count: int, max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Training samples (prompt + their target text when the row has one), right-padded."""
    picked = rows[:count]
    has_target = all(target_text(r) for r in picked)
    if has_target:
        seqs = [ids for ids, _ in answer_samples(tokenizer, picked, max_length)]
    else:
        seqs = [encode_prompt(tokenizer, r["prompt"]) for r in picked]
    return pad(seqs, tokenizer.pad_token_id, "right")


class LiveMonitor:
    """Measures every `every` steps; a dense policy gets one clear message, then the monitor is off."""

    def __init__(self, cfg, tokenizer, rows: list[dict]):
        ids, mask = probe_from_rows(tokenizer, rows, cfg.probe_samples)
        self.monitor = PathwayMonitor(ids, mask, tau=cfg.tau, level=cfg.level)
        self.every = cfg.every
        self.enabled = True

    def maybe_measure(self, model, step: int) -> dict[str, float]:
        if not self.enabled or step % self.every:
            return {}
        try:
            return self.monitor.measure(model)
        except ValueError as err:
            print(f"[bridgerl] monitor.pathways is off for this run: {err}")
            self.enabled = False
            return {}

    def state_dict(self) -> dict:
        return {"enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        self.enabled = state["enabled"]
