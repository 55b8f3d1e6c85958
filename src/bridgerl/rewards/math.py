"""Binary math reward with HF Math-Verify, configured as in algorithms.md §1.2.

- gold: wrapped as `$…$`, LaTeX extraction with basic-LaTeX, units and malformed-operator
  normalisation, equations off, `\\boxed` not stripped;
- prediction: LaTeX extraction with `\\boxed{}` matched first (priority 0);
- `verify(gold, pred, float_rounding=6)`: 1.0 if equal, else 0.0; any exception gives 0.

Math-Verify's own timeouts use `signal.alarm`, which fails off the main thread and counts wall
time; they are always off here. In the trainer process each sample runs under
`call_with_timeout` (a thread), which cannot stop a computation that holds the GIL inside one C
call (sympy on `9^{9^{9^{9}}}`). In a reward worker process (rewards/pool.py) scoring runs on
that process's main thread under `cpu_time_limit` (SIGPROF, CPU time, so a busy machine does not
turn slow samples into zeros), and the pool's SIGKILL backs it up.
"""
from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache
from typing import Any, Sequence

from .timeout import call_with_timeout, cpu_time_limit

__all__ = ["math_reward", "math_verify_score", "completion_text"]

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_TIMEOUT_S = 5.0


class _DropTimeoutDisabledWarning(logging.Filter):
    # Math-Verify warns once that its timeout is off; ours is on, so the warning misleads.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@lru_cache(maxsize=1)
def _configs() -> tuple[list, list, list]:
    """(gold config, prediction config, prediction config with plain-expression fallback)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    gold = [LatexExtractionConfig(normalization_config=NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=False, boxed="none", equations=False))]
    pred = [LatexExtractionConfig(boxed_match_priority=0)]
    return gold, pred, pred + [ExprExtractionConfig()]


WORKER_ENV = "BRIDGERL_REWARD_WORKER"  # set by rewards/pool.py in its worker processes


def _signals_usable() -> bool:
    """True on the main thread of a reward worker, where SIGALRM may interrupt scoring."""
    return os.environ.get(WORKER_ENV) == "1" and threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    # Cached: the n rollouts of a prompt share one gold answer.
    from math_verify import parse

    gold_cfg, _, _ = _configs()
    return tuple(parse(f"${answer}$", gold_cfg, parsing_timeout=None))


def _score_one(completion: str, answer: str, expr_fallback: bool) -> float:
    from math_verify import parse, verify

    gold = list(_parse_gold(answer))
    if not gold:
        return 0.0
    _, pred_cfg, pred_cfg_expr = _configs()
    pred = parse(completion, pred_cfg_expr if expr_fallback else pred_cfg, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, float_rounding=6, timeout_seconds=None) else 0.0


def math_verify_score(completion: str, answer: str, timeout_s: float | None = DEFAULT_SAMPLE_TIMEOUT_S,
                      expr_fallback: bool = False) -> float:
    """1.0 if Math-Verify finds `completion`'s answer equal to the gold `answer`, else 0.0.

    Exceptions and timeouts give 0.0 (§1.2). `expr_fallback=True` also accepts a bare
    final expression ("The answer is 0.5") when no LaTeX/boxed answer is found; off by
    default to match §1.2.
    """
    try:
        if timeout_s is not None and _signals_usable():
            # In CPU time, not Math-Verify's wall-clock alarm: a sample the worker only waited for a
            # core for must not score 0 on a loaded machine (that made runs depend on the load).
            with cpu_time_limit(timeout_s):
                return _score_one(completion, str(answer), expr_fallback)
        return call_with_timeout(_score_one, (completion, str(answer), expr_fallback), timeout_s)
    except TimeoutError:
        logger.warning("Math-Verify timed out after %s s on a completion; scored 0", timeout_s)
        return 0.0
    except BaseException as exc:  # noqa: BLE001 — Math-Verify raises BaseException subclasses
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("Math-Verify failed; scored 0", exc_info=True)
        return 0.0


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or (TRL conversational format) the last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def math_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None, *,
                answers: Sequence[Any] | None = None, timeout_s: float | None = DEFAULT_SAMPLE_TIMEOUT_S,
                expr_fallback: bool = False, **_: Any) -> list[float]:
    """Math-Verify reward in {0, 1} for each completion against its gold answer.

    TRL-style: call with keywords, `answer` being the dataset column (`answers=` also works);
    other columns such as `prompts` or `task` are ignored.
    """
    golds = answer if answer is not None else answers
    if golds is None:
        raise TypeError("math_reward needs the gold answers: pass answer=[...] (the dataset's 'answer' column)")
    if len(golds) != len(completions):
        raise ValueError(f"math_reward got {len(completions)} completions but {len(golds)} answers")
    return [0.0 if gold is None else math_verify_score(completion_text(c), str(gold), timeout_s, expr_fallback)
            for c, gold in zip(completions, golds)]


# rewards/pool.py calls this in a new worker: Math-Verify's and sympy's imports and first parse.
math_reward.warm_up = lambda: math_verify_score("$\\boxed{1}$", "1", timeout_s=None)
