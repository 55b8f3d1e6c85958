"""Reward kinds → builders, and the one function that turns `rewards:` config into a RewardRouter.

A new kind is one `register_reward("kind", builder)` call; nothing outside rewards/ dispatches on
kinds. A builder gets the task's config and a `BuildContext` (device, the shared process pool)
and returns a TRL-style reward function.

Where each kind runs:
- `math`, `reasoning_gym`, `python`: in the reward worker processes (rewards/pool.py), where a
  call past `rewards.timeout_s` is killed; `rewards.processes: 0` runs them in this process
  instead (timeout threads, which cannot stop a call stuck in C code).
- `partial`: in process (a regex and a float; nothing to hang on).
- `model`: in process (a forward on the trainer's device; a worker would need its own copy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .pool import PooledReward, RewardPool, shared_pool
from .python_fn import load_callable

__all__ = ["register_reward", "build_reward_fn", "build_rewarder", "BuildContext", "REWARD_KINDS"]

MATH_SPEC = "bridgerl.rewards.math:math_reward"
REASONING_GYM_SPEC = "bridgerl.rewards.reasoning_gym:reasoning_gym_reward"
# Math-Verify's own (signal) timeout inside a worker, as a share of the hard timeout: the cheap
# in-process stop fires first and scores 0 (algorithms.md §1.2); the kill is the backstop.
MATH_SOFT_TIMEOUT_SHARE = 0.5


@dataclass
class BuildContext:
    device: Any = "cpu"
    processes: int = 0  # 0: everything in this process
    timeout_s: float | None = 10.0
    pool: RewardPool | None = None  # the process-wide pool of this size, once a pooled kind needs it
    preload: list[str] = field(default_factory=list)

    def pooled(self, spec: str, per_sample: bool, extra: dict | None = None) -> PooledReward | None:
        """A reward run by name in the shared pool (created on first use), or None without one."""
        if self.processes < 1:
            return None
        if self.pool is None:
            self.pool = shared_pool(self.processes, tuple(self.preload))
        return PooledReward(spec, self.pool, per_sample, dict(extra or {}))


Builder = Callable[[Any, BuildContext], Callable]
REWARD_KINDS: dict[str, Builder] = {}


def register_reward(kind: str, builder: Builder) -> None:
    REWARD_KINDS[kind] = builder


def _math(task, ctx: BuildContext):
    from .math import DEFAULT_SAMPLE_TIMEOUT_S, math_reward

    soft = DEFAULT_SAMPLE_TIMEOUT_S if ctx.timeout_s is None else max(1.0, ctx.timeout_s * MATH_SOFT_TIMEOUT_SHARE)
    return ctx.pooled(MATH_SPEC, per_sample=True, extra={"timeout_s": soft}) or math_reward


def _partial(task, ctx: BuildContext):
    from .partial import partial_credit_reward

    return partial_credit_reward


def _python(task, ctx: BuildContext):
    fn = load_callable(task.function)  # here, so a bad name fails before any model loads
    return ctx.pooled(task.function, per_sample=False) or fn


def _model(task, ctx: BuildContext):
    from .model import RewardModelScorer

    return RewardModelScorer(task.path, device=ctx.device)


def _reasoning_gym(task, ctx: BuildContext):
    from .reasoning_gym import reasoning_gym_reward

    return ctx.pooled(REASONING_GYM_SPEC, per_sample=True) or reasoning_gym_reward


for _kind, _builder in (("math", _math), ("partial", _partial), ("python", _python), ("model", _model),
                        ("reasoning_gym", _reasoning_gym)):
    register_reward(_kind, _builder)


def build_reward_fn(task, ctx: BuildContext) -> Callable:
    if task.kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {task.kind!r}; registered kinds: {sorted(REWARD_KINDS)}")
    return REWARD_KINDS[task.kind](task, ctx)


def build_rewarder(rewards_cfg, default_task: str | None = None, device: Any = "cpu"):
    """The RewardRouter for a `rewards:` config section (config.RewardsConfig)."""
    from .router import RewardRouter

    processes = getattr(rewards_cfg, "processes", 0)
    tasks = rewards_cfg.tasks
    kinds = {t.kind for t in tasks.values()}
    preload = [s for k, s in (("math", MATH_SPEC), ("reasoning_gym", REASONING_GYM_SPEC)) if k in kinds]
    preload += [t.function for t in tasks.values() if t.kind == "python"]
    ctx = BuildContext(device=device, processes=processes, timeout_s=rewards_cfg.timeout_s, preload=preload)
    fns = {}
    for name, t in tasks.items():
        try:
            fns[name] = build_reward_fn(t, ctx)
        except (ImportError, AttributeError, TypeError, ValueError) as err:
            if t.kind != "python":
                raise
            from ..config import ConfigError
            raise ConfigError(f"config key 'rewards.tasks.{name}.function' = {t.function!r}: {err}") from err
    return RewardRouter(fns, failure_score=rewards_cfg.failure_score, timeout_s=rewards_cfg.timeout_s,
                        default_task=default_task)
