"""The reasoning-gym reward: each completion scored by its dataset's own `score_answer`.

A dataset's scorer is plain Python over the model's text, so it runs in the reward worker
processes (rewards/pool.py) like Math-Verify: a scorer that hangs on some answer is killed.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

from .math import completion_text
from .python_fn import extract_final_answer

__all__ = ["reasoning_gym_reward"]


@lru_cache(maxsize=None)
def _score_fn(dataset_name: str) -> Callable:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError("reasoning-gym tasks need the reasoning_gym package: pip install reasoning-gym") from exc
    return reasoning_gym.get_score_answer_fn(dataset_name)


def reasoning_gym_reward(completions: Sequence[Any], entry: Sequence[dict] | None = None,
                         task: Sequence[str] | None = None, **_: Any) -> list[float]:
    """Score each completion with its reasoning-gym dataset's own `score_answer`.

    `entry` is the column holding the reasoning-gym item (question, answer, metadata);
    the dataset is `entry["metadata"]["source_dataset"]`, else the `rg:<name>` task.
    """
    if entry is None:
        raise TypeError("reasoning_gym_reward needs entry=[...]: build rows with data.tasks.reasoning_gym_rows")
    if len(entry) != len(completions):
        raise ValueError(f"reasoning_gym_reward got {len(completions)} completions but {len(entry)} entries")
    scores = []
    for k, (completion, item) in enumerate(zip(completions, entry)):
        name = (item.get("metadata") or {}).get("source_dataset")
        if name is None and task is not None:
            name = str(task[k]).removeprefix("rg:")
        if name is None:
            raise ValueError("reasoning-gym entry has no metadata.source_dataset and no rg:<name> task")
        answer = extract_final_answer(completion_text(completion))
        scores.append(float(_score_fn(name)(answer, item)))
    return scores
