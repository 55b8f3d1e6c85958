"""Collapse alarms: detectors over a step's metrics that say when training has gone wrong.

Pure (no model): `CollapseAlarm.update(metrics)` reads the step's metrics and returns
the warnings that fired this step. A detector fires once when its condition has held for its
`steps` and re-arms when the condition clears, so a long collapse is one warning, not one per
step. `flags()` gives `alarm/<name>` metrics (1.0 while a condition holds) for the log.

Detectors (thresholds in `train.alarms`, None turns one off):
- entropy collapse: the sampler's mean token entropy below `entropy_min` for `entropy_steps`;
- length: more than `length_share` of samples stopped by `max_new_tokens` for `length_steps`;
- reward collapse: the batch's reward std below `reward_std_min` for `reward_steps` (every sample
  scores the same: no learning signal);
- reward explosion: the batch's mean reward more than `reward_z` running standard deviations
  from its running mean (after `reward_warmup` steps), or outside `reward_abs_max`, or not finite.

What follows is `train.on_collapse`: `warn` logs; `stop` ends the run after the step (its
checkpoint is written); `rollback` restores the last checkpoint and multiplies the learning
rate by `rollback_lr_factor` (`rollback(run, factor)` below), at most `max_rollbacks` times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CollapseAlarm", "clipped_share", "rollback", "respond"]


def clipped_share(completion_mask: torch.Tensor, eos_seen: torch.Tensor, max_new_tokens: int) -> float:
    """Share of samples that ran to `max_new_tokens` without an EOS: the loop's
    `completion/clipped_share` metric, which the length detector reads.

    completion_mask [S, T] long; eos_seen [S] bool (the sample ended with an EOS token)."""
    lengths = completion_mask.sum(dim=1)
    clipped = (lengths >= max_new_tokens) & ~eos_seen
    return clipped.float().mean().item() if clipped.numel() else 0.0


@dataclass
class _Streak:
    steps: int = 0  # consecutive steps the condition held
    fired: bool = False  # warned for this streak already


@dataclass
class _Running:
    """Exponential moving mean and variance of a metric (Welford-style, decay `beta`)."""
    count: int = 0
    mean: float = 0.0
    var: float = 0.0

    def z(self, x: float) -> float:
        sd = math.sqrt(self.var)
        return abs(x - self.mean) / sd if sd > 0 else (0.0 if x == self.mean else math.inf)

    def add(self, x: float, beta: float = 0.9) -> None:
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            delta = x - self.mean
            self.mean += (1 - beta) * delta
            self.var = beta * (self.var + (1 - beta) * delta * delta)
        self.count += 1


@dataclass
class CollapseAlarm:
    cfg: Any  # config.AlarmsConfig
    max_new_tokens: int
    streaks: dict[str, _Streak] = field(default_factory=dict)
    reward: _Running = field(default_factory=_Running)
    rollbacks: int = 0
    _holding: dict[str, bool] = field(default_factory=dict)

    def _check(self, name: str, holds: bool, need: int, message: str, out: list[str]) -> None:
        s = self.streaks.setdefault(name, _Streak())
        self._holding[name] = holds
        if not holds:
            s.steps, s.fired = 0, False
            return
        s.steps += 1
        if s.steps >= need and not s.fired:
            s.fired = True
            out.append(message)

    def update(self, metrics: dict[str, float]) -> list[str]:
        """The warnings that fire on this step's metrics (usually none)."""
        c, out = self.cfg, []
        self._holding = {}
        entropy = metrics.get("entropy")
        if c.entropy_min is not None and entropy is not None:
            self._check("entropy_collapse", entropy < c.entropy_min, c.entropy_steps,
                        f"entropy collapse: sampler entropy {entropy:.4f} < {c.entropy_min} for {c.entropy_steps} "
                        "steps; the policy has become (nearly) deterministic", out)
        share = metrics.get("completion/clipped_share")
        if c.length_share is not None and share is not None:
            self._check("length", share > c.length_share, c.length_steps,
                        f"length: {share:.0%} of samples hit max_new_tokens={self.max_new_tokens} for "
                        f"{c.length_steps} steps (limit {c.length_share:.0%}); raise rollout.max_new_tokens or "
                        "check for degenerate repetition", out)
        std = metrics.get("reward/std")
        if c.reward_std_min is not None and std is not None:
            self._check("reward_collapse", std < c.reward_std_min, c.reward_steps,
                        f"reward collapse: reward std {std:.2e} < {c.reward_std_min} for {c.reward_steps} steps; "
                        "every sample scores the same, so there is nothing to learn from", out)
        mean = metrics.get("reward/mean")
        if mean is not None:
            exploded = not math.isfinite(mean) or (c.reward_abs_max is not None and abs(mean) > c.reward_abs_max)
            warm = self.reward.count >= c.reward_warmup
            if c.reward_z is not None and warm and not exploded:
                exploded = self.reward.z(mean) > c.reward_z
            self._check("reward_explosion", exploded, 1,
                        f"reward explosion: mean reward {mean:.4g} vs running mean {self.reward.mean:.4g} "
                        f"(sd {math.sqrt(self.reward.var):.3g}); check the reward function for a hack or a bug", out)
            if math.isfinite(mean) and not exploded:  # an outlier must not drag the baseline along
                self.reward.add(mean)
        return out

    def flags(self) -> dict[str, float]:
        """`alarm/<detector>`: 1.0 where the condition holds at this step, else 0.0."""
        return {f"alarm/{k}": float(v) for k, v in self._holding.items()}

    def state_dict(self) -> dict:
        return {"streaks": {k: [s.steps, s.fired] for k, s in self.streaks.items()},
                "reward": [self.reward.count, self.reward.mean, self.reward.var], "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.streaks = {k: _Streak(int(v[0]), bool(v[1])) for k, v in state["streaks"].items()}
        count, mean, var = state["reward"]
        self.reward = _Running(int(count), float(mean), float(var))
        self.rollbacks = int(state["rollbacks"])

    def reset_streaks(self) -> None:
        """After a rollback: the restored weights start with a clean record (the baseline stays)."""
        self.streaks = {}


def rollback(run, lr_factor: float) -> str:
    """Restore `run` to its latest checkpoint and multiply its learning rate by `lr_factor`.

    The scheduler's base rates are scaled too (LambdaLR recomputes lr = base_lr × factor at every
    step, so scaling only the optimizer's lr would be undone at the next step), and the scaled
    rates are saved with the next checkpoint, so a resume keeps them. Returns a log line.
    Raises RuntimeError when there is no checkpoint to return to."""
    from .checkpoint import latest_checkpoint, load_checkpoint, load_run_state

    ckpt = latest_checkpoint(run.out_dir)
    if ckpt is None:
        raise RuntimeError("train.on_collapse=rollback found no checkpoint to return to; set "
                           "train.checkpoint_every so that there is one")
    failed_step = run.step
    load_run_state(run, load_checkpoint(ckpt))
    for group in run.optimizer.param_groups:
        group["lr"] *= lr_factor
        if "initial_lr" in group:
            group["initial_lr"] *= lr_factor
    run.scheduler.base_lrs = [lr * lr_factor for lr in run.scheduler.base_lrs]
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    return (f"collapse at step {failed_step}: rolled back to {ckpt.name} (step {run.step}); learning rate × "
            f"{lr_factor} → {run.optimizer.param_groups[0]['lr']:.3g}")


def respond(run, alarm: CollapseAlarm, warnings: list[str], on_collapse: str, lr_factor: float = 0.5,
            max_rollbacks: int = 3, log=print) -> bool:
    """Act on this step's warnings as `train.on_collapse` says; True means stop the run.

    `warn`: log them. `stop`: log and stop. `rollback`: restore the last checkpoint with the
    learning rate × `lr_factor`, or stop once `max_rollbacks` are spent. The alarm's own state
    survives the rollback (if the loop keeps it in the checkpoint, load_state would otherwise
    put back its old rollback count)."""
    if not warnings:
        return False
    for w in warnings:
        log(f"[bridgerl] step {run.step}: ALARM {w}")
    if on_collapse == "warn":
        return False
    if on_collapse == "stop":
        log(f"[bridgerl] train.on_collapse=stop: stopping at step {run.step}")
        return True
    if alarm.rollbacks >= max_rollbacks:
        log(f"[bridgerl] {alarm.rollbacks} rollbacks spent (train.alarms.max_rollbacks); stopping at step {run.step}")
        return True
    kept = alarm.state_dict()
    log("[bridgerl] " + rollback(run, lr_factor))
    alarm.load_state_dict(kept)
    alarm.rollbacks += 1
    alarm.reset_streaks()
    return False
