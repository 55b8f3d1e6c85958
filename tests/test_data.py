"""Data: loading and validating rows, built-in tasks, and the resumable prompt stream."""
from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ["HF_HUB_OFFLINE"] = "1"

from bridgerl.data.formats import DataError, load_preference_rows, load_rows, load_sft_rows  # noqa: E402
from bridgerl.data.stream import PromptStream  # noqa: E402
from bridgerl.data.tasks import (  # noqa: E402
    DIFFICULTIES,
    arithmetic_rows,
    builtin_rows,
    hidden_rule_score,
    parse_difficulty,
    preference_rows,
)


def _write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# ---- formats ----------------------------------------------------------------------------------


def test_load_rows_normalises(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}]
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 1+1?", "answer": 2, "level": 1},
        "",  # blank lines are skipped
        {"messages": chat, "answer": "6", "task": "math"},
        {"prompt": [{"role": "user", "content": "hi"}], "task": "chat"},
    ])
    rows = load_rows(path, default_task="arith")
    assert rows[0] == {"prompt": "What is 1+1?", "answer": "2", "level": 1, "task": "arith"}
    assert rows[1]["prompt"] == chat[:4]  # up to the last user turn
    assert rows[1]["messages"] == chat and rows[1]["task"] == "math"
    assert rows[2]["prompt"] == [{"role": "user", "content": "hi"}] and "answer" not in rows[2]


def test_load_rows_custom_fields_and_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": [{"question": "q1", "solution_value": "1", "kind": "k"}],
                                "test": [{"question": "q2", "solution_value": "2"}]}))
    rows = load_rows(path, split="test", prompt_field="question", answer_field="solution_value",
                     task_field="kind")
    assert rows == [{"prompt": "q2", "answer": "2", "task": "default"}]
    assert load_rows(path, prompt_field="question", answer_field="solution_value", task_field="kind")[0]["task"] == "k"
    listed = tmp_path / "l.json"
    listed.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert [r["prompt"] for r in load_rows(listed)] == ["a", "b"]


@pytest.mark.parametrize("bad_line, pattern", [
    ('{"prompt": "x", ', r"d\.jsonl, line 7: invalid JSON"),
    ('{"answer": "3"}', r"d\.jsonl, line 7: missing field 'prompt'"),
    ('{"messages": "hello"}', r"d\.jsonl, line 7, field 'messages': expected a non-empty list"),
    ('{"messages": [{"role": "user"}]}', r"d\.jsonl, line 7, field 'messages': message 0 must be a dict"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', r"line 7, field 'messages': .*no 'user' turn"),
    ('{"prompt": "x", "answer": [1, 2]}', r"line 7, field 'answer': expected a string or number"),
    ('{"prompt": "x", "task": 5}', r"line 7, field 'task': expected a non-empty string"),
    ('[1, 2]', r"line 7: expected a JSON object"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, bad_line, pattern):
    lines = [json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(6)] + [bad_line]
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=pattern):
        load_rows(path)


def test_load_rows_datasets_folder_and_missing_path(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]),
                 "test": Dataset.from_list([{"prompt": "c", "answer": "3"}])}).save_to_disk(str(folder))
    assert [r["prompt"] for r in load_rows(folder)] == ["a", "b"]
    assert load_rows(folder, split="test") == [{"prompt": "c", "answer": "3", "task": "default"}]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_rows(folder, split="dev")
    bad = tmp_path / "bad"
    Dataset.from_list([{"prompt": "a"}, {"text": "b"}]).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"bad, row 2: missing field 'prompt'"):
        load_rows(bad)
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")
    empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no rows"):
        load_rows(empty)


def test_load_sft_rows(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": conv},
        {"prompt": "1+1?", "solution": "1 + 1 = 2. The final answer is $\\boxed{2}$.", "answer": "2"},
        {"prompt": "2+2?", "completion": "4"},
    ])
    rows = load_sft_rows(path)
    assert rows[0]["prompt"] == conv[:1] and rows[0]["completion"] == "hello"
    assert rows[1]["completion"].endswith("$\\boxed{2}$.")  # solution is preferred over the bare answer
    assert rows[2]["completion"] == "4" and rows[2]["task"] == "default"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: missing the target text"):
        load_sft_rows(bad)
    bad_conv = _write_jsonl(tmp_path / "bad2.jsonl", [{"messages": conv[:1]}])
    with pytest.raises(DataError, match="must end with an 'assistant' turn"):
        load_sft_rows(bad_conv)


def test_load_preference_rows(tmp_path):
    conv = lambda text: [{"role": "user", "content": "pick"}, {"role": "assistant", "content": text}]  # noqa: E731
    path = _write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"chosen": conv("yes"), "rejected": conv("no")},
    ])
    rows = load_preference_rows(path)
    assert rows[0] == {"prompt": "p", "chosen": "good", "rejected": "bad"}
    assert rows[1]["prompt"] == conv("x")[:1] and (rows[1]["chosen"], rows[1]["rejected"]) == ("yes", "no")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c"}] * 2 + [{"prompt": "p"}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: missing field 'rejected'"):
        load_preference_rows(bad)


# ---- built-in tasks ---------------------------------------------------------------------------


def _expression(row: dict) -> tuple:
    """The arithmetic behind a row, read back from its worked solution."""
    return tuple(re.findall(r"(\d+) ([-+*]) (\d+) =", row["solution"]))


def _check_solution(row: dict) -> None:
    value = None
    for a, op, b, result in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", row["solution"]):
        a, b, result = int(a), int(b), int(result)
        assert value is None or a == value
        assert result == {"+": a + b, "-": a - b, "*": a * b}[op]
        value = result
    assert str(value) == row["answer"]
    assert row["solution"].endswith(f"The final answer is $\\boxed{{{row['answer']}}}$.")


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), level=st.sampled_from(sorted(DIFFICULTIES)))
def test_arithmetic_deterministic_disjoint_and_correct(seed, level):
    train = arithmetic_rows(200, seed, "train", level)
    test = arithmetic_rows(40, seed, "test", level)
    assert train == arithmetic_rows(200, seed, "train", level)  # same seed, same rows
    assert train != arithmetic_rows(200, seed + 1, "train", level)
    assert len({r["prompt"] for r in train}) == 200 and len({r["prompt"] for r in test}) == 40
    # Disjoint not only by prompt text but by the arithmetic itself
    assert not {_expression(r) for r in train} & {_expression(r) for r in test}
    diff = DIFFICULTIES[level]
    for row in train + test:
        assert row["task"] == "arithmetic" and int(row["answer"]) >= 0
        assert diff.operands[0] - 1 <= len(_expression(row)) <= diff.operands[1] - 1
        _check_solution(row)


def test_arithmetic_prompt_shape_and_reward():
    from bridgerl.rewards.math import math_reward

    rows = arithmetic_rows(20, 0, "train", "easy")
    assert all(len(r["prompt"].split()) <= 20 for r in rows)
    assert re.fullmatch(r"\w+ has \d+ \w+\. .+ How many \w+ does (he|she) have now\?", rows[0]["prompt"])
    # the SFT target earns reward 1 under the task's own reward
    assert math_reward([r["solution"] for r in rows], answer=[r["answer"] for r in rows]) == [1.0] * 20


def test_difficulty_parsing_and_registry():
    assert parse_difficulty("operands=3,digits=2-3,ops=*") == parse_difficulty("operands=3-3,digits=2-3,ops=*")
    with pytest.raises(ValueError, match="unknown arithmetic difficulty 'impossible'"):
        parse_difficulty("impossible")
    with pytest.raises(ValueError, match="ops"):
        parse_difficulty("ops=/")
    hard = builtin_rows("arithmetic:hard", 5, 3, "train")
    assert all(2 <= len(_expression(r)) <= 3 for r in hard)
    assert builtin_rows("arithmetic", 5, 3, "test") == arithmetic_rows(5, 3, "test")
    with pytest.raises(ValueError, match="unknown built-in task"):
        builtin_rows("sudoku", 5, 0)
    with pytest.raises(ValueError, match="unknown split"):
        builtin_rows("arithmetic", 5, 0, "dev")
    with pytest.raises(ValueError, match="could only generate"):
        # 72 products x 36 name/item wordings, ~10% held out: far fewer than 400 distinct test prompts
        arithmetic_rows(400, 0, "test", "operands=2,digits=1,ops=*")


def test_reasoning_gym_rows():
    pytest.importorskip("reasoning_gym")
    from bridgerl.rewards.reasoning_gym import reasoning_gym_reward

    train = builtin_rows("rg:leg_counting", 30, 0, "train")
    test = builtin_rows("rg:leg_counting", 5, 0, "test")
    assert train == builtin_rows("rg:leg_counting", 30, 0, "train")
    assert {r["task"] for r in train + test} == {"rg:leg_counting"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert reasoning_gym_reward([f"\\boxed{{{r['answer']}}}" for r in test], entry=[r["entry"] for r in test]) \
        == [1.0] * 5
    small = builtin_rows("rg:basic_arithmetic:min_terms=2,max_terms=2", 4, 0, "train")
    assert all(r["entry"]["metadata"]["num_terms"] == 2 for r in small)
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'"):
        builtin_rows("rg:nope", 2, 0)


def test_preference_rows_follow_the_hidden_rule():
    rows = preference_rows(200, seed=1)
    assert rows == preference_rows(200, seed=1)
    assert all(hidden_rule_score(r["chosen"]) == 1.0 and hidden_rule_score(r["rejected"]) == 0.0 for r in rows)
    # only the keyword differs: same word count, same place
    assert all(len(r["chosen"].split()) == len(r["rejected"].split()) for r in rows)
    assert len({r["prompt"] for r in rows}) > 10
    held = preference_rows(50, seed=1, split="test")
    key = lambda r: (r["prompt"], r["chosen"].replace("thanks", ""))  # noqa: E731
    assert not {key(r) for r in rows} & {key(r) for r in held}
    assert hidden_rule_score("Thanks, i like red.") == 1.0 and hidden_rule_score("thanksgiving") == 0.0


# ---- stream -----------------------------------------------------------------------------------


def _rows(n):
    return [{"prompt": f"p{i}", "answer": str(i)} for i in range(n)]


def _ids(batches):
    return [[r["id"] for r in b] for b in batches]


def test_stream_epochs_are_seeded_permutations():
    rows = _rows(10)
    stream = PromptStream(rows, batch_size=5, seed=3)
    epochs = [sum(_ids([stream.next_batch(), stream.next_batch()]), []) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    again = PromptStream(rows, batch_size=5, seed=3)
    assert sum(_ids([again.next_batch(), again.next_batch()]), []) == epochs[0]
    batch = PromptStream(rows, 4, seed=0).next_batch()
    assert all(r["prompt"] == rows[r["id"]]["prompt"] for r in batch)  # id = index into rows
    assert "id" not in rows[0]  # emitted rows are copies
    plain = PromptStream(rows, 4, seed=0, shuffle=False)
    assert _ids([plain.next_batch() for _ in range(3)]) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_stream_explicit_order_repeats():
    stream = PromptStream(_rows(10), batch_size=4, seed=0, order=[7, 2, 5])
    assert _ids([stream.next_batch() for _ in range(3)]) == [[7, 2, 5, 7], [2, 5, 7, 2], [5, 7, 2, 5]]
    with pytest.raises(ValueError, match="out of range"):
        PromptStream(_rows(3), 2, 0, order=[0, 3])
    with pytest.raises(ValueError, match="empty"):
        PromptStream(_rows(3), 2, 0, order=[])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), batch_size=st.integers(1, 12), before=st.integers(0, 10), after=st.integers(1, 10),
       seed=st.integers(0, 2**31), ordered=st.booleans())
def test_stream_state_round_trip_continues_identically(n, batch_size, before, after, seed, ordered):
    rows = _rows(n)
    order = list(range(n))[::-2] if ordered else None
    stream = PromptStream(rows, batch_size, seed, order=order)
    for _ in range(before):
        stream.next_batch()
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as plain data
    expected = _ids([stream.next_batch() for _ in range(after)])
    resumed = PromptStream(rows, batch_size, seed, order=order)
    resumed.load_state_dict(state)
    assert _ids([resumed.next_batch() for _ in range(after)]) == expected


def test_stream_refuses_state_from_other_data():
    stream = PromptStream(_rows(5), 2, seed=0)
    stream.next_batch()
    with pytest.raises(ValueError, match="same data, seed"):
        PromptStream(_rows(6), 2, seed=0).load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="same data, seed"):
        PromptStream(_rows(5), 2, seed=1).load_state_dict(stream.state_dict())
