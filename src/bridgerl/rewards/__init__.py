"""Rewards: Math-Verify, reward models, user Python functions, reasoning-gym, and the per-task router.

Every reward function has TRL's signature, called with keywords:
`f(prompts=[...], completions=[...], **columns) -> list[float]`.
"""
from .math import math_reward, math_verify_score
from .model import RewardModelScorer
from .python_fn import extract_final_answer, load_callable, reasoning_gym_reward
from .router import FAILURE_KINDS, RewardRouter
from .timeout import TimeoutPool, call_with_timeout

__all__ = [
    "FAILURE_KINDS",
    "RewardModelScorer",
    "RewardRouter",
    "TimeoutPool",
    "call_with_timeout",
    "extract_final_answer",
    "load_callable",
    "math_reward",
    "math_verify_score",
    "reasoning_gym_reward",
]
