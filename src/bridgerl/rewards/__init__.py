"""Rewards: Math-Verify, reward models, user Python functions, reasoning-gym, the per-task router,
the registry that builds it from the config, and the process pool that runs verifiers.

Every reward function has TRL's signature, called with keywords:
`f(prompts=[...], completions=[...], **columns) -> list[float]`.

Names are imported on first use: reward worker processes import this package and must start
without loading torch (which `model` and `router` need).
"""
from importlib import import_module

_EXPORTS = {
    "FAILURE_KINDS": "router", "RewardRouter": "router",
    "RewardModelScorer": "model",
    "extract_final_answer": "python_fn", "load_callable": "python_fn",
    "reasoning_gym_reward": "reasoning_gym",
    "math_reward": "math", "math_verify_score": "math",
    "TimeoutPool": "timeout", "call_with_timeout": "timeout",
    "RewardPool": "pool", "PooledReward": "pool",
    "build_rewarder": "registry", "register_reward": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bridgerl.rewards' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
