"""A non-binary verifiable reward: partial credit for numeric answers by relative error.

Binary rewards are already variance-optimal (algorithms.md §3.4), so GRPOVI only does something
with graded rewards; this one keeps the task verifiable while giving a spread of scores."""
from __future__ import annotations

import re
from typing import Any, Sequence

from .math import completion_text
from .python_fn import extract_final_answer

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def partial_credit(pred: str | None, gold: str) -> float:
    """1 for the exact number, falling linearly to 0 at 100% relative error; 0 if unparsable.
    An answer in the right format earns a floor of 0.1, so format alone is distinguishable."""
    if pred is None:
        return 0.0
    found = _NUMBER.findall(pred.replace(",", ""))
    try:
        target = float(gold)
    except ValueError:
        return 1.0 if pred.strip() == gold.strip() else 0.0
    if not found:
        return 0.0
    value = float(found[-1])
    error = abs(value - target) / max(1.0, abs(target))
    return max(0.1, 1.0 - error)


def partial_credit_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None, **_: Any) -> list[float]:
    """TRL-style reward in [0, 1]: partial credit of the last \\boxed{} (or <answer>) number."""
    if answer is None:
        raise TypeError("partial_credit_reward needs the gold answers: pass answer=[...] (the 'answer' column)")
    return [partial_credit(extract_final_answer(completion_text(c)), str(g)) for c, g in zip(completions, answer)]
