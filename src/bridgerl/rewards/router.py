"""Per-task reward routing: each sample is scored by its own task's function.

Failures become data, not crashes: a function that raises, times out, returns the wrong
number of scores, or returns None/NaN/inf gives `failure_score` for the affected samples,
the failures are counted by kind (`reward/failures/<kind>`, timeouts also as
`reward/timeouts`), and the run goes on. A `PooledReward` runs in the worker processes of
rewards/pool.py, where a timeout kills the worker; any other function runs in this process.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Callable, Sequence

import torch

from .pool import Failure, PooledReward
from .timeout import call_with_timeout

__all__ = ["RewardRouter", "FAILURE_KINDS"]

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("exception", "timeout", "length", "nan")


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


class RewardRouter:
    """Route samples to per-task reward functions (TRL signature) and collect failures.

    `task_fns` keys are task names; a key ending in `*` (e.g. `"rg:*"`) matches every task
    with that prefix when no exact key exists. A function with a `reward_timeout_s`
    attribute overrides `timeout_s` for itself (None: run inline with no limit, as
    `RewardModelScorer` does — a timed-out GPU forward would keep running in the background).
    Reward functions must accept extra keyword columns (`**kwargs`), as in TRL.
    """

    def __init__(self, task_fns: dict[str, Callable], failure_score: float = 0.0,
                 timeout_s: float | None = 10.0, default_task: str | None = None):
        if not task_fns:
            raise ValueError("RewardRouter needs at least one task -> reward function")
        if not math.isfinite(failure_score):
            raise ValueError(f"failure_score must be finite, got {failure_score}")
        self.task_fns = dict(task_fns)
        self.failure_score = float(failure_score)
        self.timeout_s = timeout_s
        self.default_task = default_task
        self._warned: set[tuple[str, str]] = set()

    def fn_for(self, task: str) -> Callable:
        if task in self.task_fns:
            return self.task_fns[task]
        prefixes = [k for k in self.task_fns if k.endswith("*") and task.startswith(k[:-1])]
        if prefixes:
            return self.task_fns[max(prefixes, key=len)]
        raise KeyError(f"no reward function for task {task!r}; known tasks: {sorted(self.task_fns)}")

    def _task_of(self, row: dict, index: int) -> str:
        task = row.get("task")
        if task is None:
            task = self.default_task
        if task is None:
            raise KeyError(f"row {index} has no 'task' and the router has no default_task; "
                           f"known tasks: {sorted(self.task_fns)}")
        return str(task)

    def _warn_once(self, task: str, fn: Callable, kind: str, detail: str) -> None:
        key = (task, kind)
        message = "reward function %s for task %r failed (%s): %s; its samples score %s"
        args = (_fn_name(fn), task, kind, detail, self.failure_score)
        if key in self._warned:
            logger.debug(message, *args)
        else:
            self._warned.add(key)
            logger.warning(message + " (further %s failures of this task are logged at debug level)",
                           *args, kind)

    def _score_task(self, task: str, prompts: list, completions: list, rows: list[dict],
                    failures: Counter) -> list[float]:
        """Scores for one task's samples, with failures replaced by `failure_score` and counted."""
        fn = self.fn_for(task)
        n = len(completions)
        keys = dict.fromkeys(k for row in rows for k in row if k != "prompt")  # union, first-seen order
        columns = {k: [row.get(k) for row in rows] for k in keys}
        kwargs = {**columns, "prompts": prompts, "completions": completions}
        timeout_s = getattr(fn, "reward_timeout_s", self.timeout_s)
        if isinstance(fn, PooledReward):
            values = fn.run(kwargs, n, float("inf") if timeout_s is None else timeout_s)
        else:
            values = self._call_in_process(fn, kwargs, n, timeout_s)
        scores = []
        bad: Counter = Counter()
        details: dict[str, str] = {}
        for v in values:
            if isinstance(v, Failure):
                bad[v.kind] += 1
                details.setdefault(v.kind, v.detail)
                scores.append(self.failure_score)
                continue
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = math.nan
            if not math.isfinite(x):
                bad["nan"] += 1
                x = self.failure_score
            scores.append(x)
        if bad["nan"]:
            details["nan"] = f"{bad['nan']} of {n} scores were None, NaN, inf or not numbers"
        for kind, count in bad.items():
            failures[kind] += count
            self._warn_once(task, fn, kind, details[kind])
        return scores

    @staticmethod
    def _call_in_process(fn: Callable, kwargs: dict, n: int, timeout_s: float | None) -> list[Any]:
        """One whole-batch call on a timeout thread; a failed call fails all its samples."""
        try:
            raw = call_with_timeout(fn, (), timeout_s, kwargs=kwargs)
        except TimeoutError as exc:
            return [Failure("timeout", str(exc))] * n
        except Exception as exc:  # noqa: BLE001 — any user error becomes a counted failure
            return [Failure("exception", f"{type(exc).__name__}: {exc}")] * n
        try:
            values = list(raw)
        except TypeError:
            values = None
        if values is None or len(values) != n:
            got = f"{len(values)} scores" if values is not None else f"a {type(raw).__name__}"
            return [Failure("length", f"returned {got} for {n} samples")] * n
        return values

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 rows: Sequence[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scores `[len(completions)]` float32 in input order, and metrics.

        `rows[i]` is the dataset row of sample i (its `task` and the columns passed on).
        """
        if not (len(prompts) == len(completions) == len(rows)):
            raise ValueError(f"RewardRouter got {len(prompts)} prompts, {len(completions)} completions and "
                             f"{len(rows)} rows; they must match one per sample")
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self._task_of(row, i), []).append(i)
        for task in groups:  # fail fast on an unknown task before calling anything
            self.fn_for(task)
        scores = torch.full((len(rows),), self.failure_score, dtype=torch.float32)
        failures: Counter = Counter()
        metrics: dict[str, float] = {}
        for task, idx in groups.items():
            task_scores = self._score_task(task, [prompts[i] for i in idx], [completions[i] for i in idx],
                                           [rows[i] for i in idx], failures)
            values = torch.tensor(task_scores, dtype=torch.float32)
            scores[torch.tensor(idx)] = values
            metrics[f"reward/{task}/mean"] = values.mean().item()
            metrics[f"reward/{task}/count"] = float(len(idx))
        metrics["reward/failures"] = float(sum(failures.values()))
        metrics["reward/timeouts"] = float(failures["timeout"])
        for kind in FAILURE_KINDS:
            metrics[f"reward/failures/{kind}"] = float(failures[kind])
        return scores, metrics
