"""Reward kinds → builders: the one place a `rewards.tasks.<task>.kind` becomes a reward function.
A new kind is one builder here (and its literal in config.TaskRewardConfig)."""
from __future__ import annotations

from typing import Callable

import torch

from .router import RewardRouter


def _math(task, device):
    from .math import math_reward
    return math_reward


def _partial(task, device):
    from .partial import partial_credit_reward
    return partial_credit_reward


def _python(task, device):
    from .python_fn import load_callable
    return load_callable(task.function)


def _model(task, device):
    from .model import RewardModelScorer
    return RewardModelScorer(task.path, device=device)


def _reasoning_gym(task, device):
    from .python_fn import reasoning_gym_reward
    return reasoning_gym_reward


REWARD_KINDS: dict[str, Callable] = {"math": _math, "partial": _partial, "python": _python, "model": _model,
                                     "reasoning_gym": _reasoning_gym}


def build_reward_fn(task, device: torch.device) -> Callable:
    return REWARD_KINDS[task.kind](task, device)


def build_rewarder(rewards_cfg, default_task: str | None, device: torch.device) -> RewardRouter:
    """The per-task router of the `rewards` config section."""
    fns = {name: build_reward_fn(t, device) for name, t in rewards_cfg.tasks.items()}
    return RewardRouter(fns, failure_score=rewards_cfg.failure_score, timeout_s=rewards_cfg.timeout_s,
                        default_task=default_task)
