"""Seed, device, optimizer + schedule, and the clipped optimizer step: what every trainer (RL, SFT,
reward model) shares."""
from __future__ import annotations

import math
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def lr_lambda_for(o, total: int):
    """Warm-up, then constant, linear or cosine decay over `total` steps, from lr down to
    lr × `min_lr_ratio` (0 unless set)."""
    floor = o.min_lr_ratio

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            decay = 1.0 - progress
        elif o.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            return 1.0
        return floor + (1.0 - floor) * decay

    return factor


def build_optimizer(params: list[torch.nn.Parameter], o, total_steps: int, fused: bool = False):
    """AdamW (config `optim`) and its warm-up + decay schedule over `total_steps`."""
    params = [p for p in params if p.requires_grad]
    # Fused AdamW: one kernel over all parameters instead of a Python loop of small ops.
    fused = fused and all(p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay,
                                  fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(o, total_steps))


def clip_and_step(params: list[torch.nn.Parameter], optimizer, scheduler, grad_clip: float) -> dict[str, float]:
    """Clip the gradient norm (0 = off), step optimizer and schedule, clear gradients. A non-finite
    norm skips the update (and says so) instead of writing NaN into the weights."""
    with_grad = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(with_grad, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor, the same on every rank
        norm = norm.full_tensor()
    if not with_grad or not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float("nan"), "update/skipped": 1.0}
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm.item(), "lr": scheduler.get_last_lr()[0]}
