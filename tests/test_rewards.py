"""Rewards: Math-Verify invariants, thread-safe timeouts, the per-task router, user callables,
the reward-model scorer on a tiny saved model, and the reasoning-gym adapter."""
from __future__ import annotations

import logging
import math
import os
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ["HF_HUB_OFFLINE"] = "1"

from bridgerl.rewards import (  # noqa: E402
    RewardModelScorer,
    RewardRouter,
    TimeoutPool,
    call_with_timeout,
    extract_final_answer,
    load_callable,
    math_reward,
    reasoning_gym_reward,
)

# ---- Math-Verify ------------------------------------------------------------------------------


def test_math_reward_invariants():
    completions = [
        "We halve it. The final answer is $\\boxed{0.5}$. I hope it is correct.",  # §6: gold \frac{1}{2} -> 1
        "no idea, sorry",  # unparsable -> 0
        "The final answer is $\\boxed{0.4}$.",  # wrong -> 0
        "$\\boxed{\\frac{2}{4}}$",  # equivalent form -> 1
        "\\boxed{",  # malformed -> 0, no exception
    ]
    scores = math_reward(completions=completions, answer=["\\frac{1}{2}"] * 5)
    assert scores == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_math_reward_boxed_has_priority_and_gold_forms():
    # boxed wins over an earlier "answer is" statement; gold may carry $…$, \boxed or units
    assert math_reward(["The answer is 3, no wait: $\\boxed{4}$"], answer=["4"]) == [1.0]
    assert math_reward(["$\\boxed{4}$"], answer=["$4$"]) == [1.0]
    assert math_reward(["$\\boxed{4}$"], answer=["\\boxed{4}"]) == [1.0]
    assert math_reward(["$\\boxed{5}$"], answer=["5 \\text{ cm}"]) == [1.0]
    assert math_reward(["$\\boxed{5}$"], answers=["6"]) == [0.0]  # `answers=` alias
    # a bare number is not a LaTeX answer under §1.2; the optional fallback accepts it
    assert math_reward(["The answer is 0.5"], answer=["\\frac12"]) == [0.0]
    assert math_reward(["The answer is 0.5"], answer=["\\frac12"], expr_fallback=True) == [1.0]


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 40), q=st.integers(2, 40), digits=st.sampled_from([2, 6]))
def test_math_reward_six_digit_precision(p, q, digits):
    decimal = f"{p / q:.{digits}f}"
    score = math_reward([f"The final answer is $\\boxed{{{decimal}}}$."], answer=[f"\\frac{{{p}}}{{{q}}}"])[0]
    assert score in (0.0, 1.0)
    # 6 decimals always agree at float_rounding=6; 2 decimals only when exact
    assert score == (1.0 if digits == 6 or round(p / q, 2) == p / q else 0.0)


def test_math_reward_runs_off_the_main_thread():
    out: list = []
    worker = threading.Thread(target=lambda: out.append(math_reward(["$\\boxed{0.5}$"], answer=["\\frac{1}{2}"])))
    worker.start()
    worker.join(timeout=30)
    assert out == [[1.0]]  # Math-Verify's signal timeout would have raised here


def test_math_reward_checks_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_reward(["a", "b"], answer=["1"])
    with pytest.raises(TypeError, match="answer"):
        math_reward(["a"])


# ---- timeouts ---------------------------------------------------------------------------------


@pytest.fixture
def release():
    """An event that hung test functions wait on; set at teardown so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def test_call_with_timeout_returns_and_raises():
    assert call_with_timeout(lambda a, b: a + b, (2, 3), 1.0) == 5
    assert call_with_timeout(lambda a, b: a * b, (2, 3), None) == 6
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, (), 1.0)


def test_timeout_from_non_main_thread_with_hanging_fn(release):
    result: dict = {}

    def caller():
        start = time.monotonic()
        try:
            call_with_timeout(release.wait, (), 0.2)
        except TimeoutError as exc:
            result["error"] = exc
        result["elapsed"] = time.monotonic() - start

    t = threading.Thread(target=caller)
    t.start()
    t.join(timeout=5)
    assert isinstance(result.get("error"), TimeoutError)
    assert 0.15 <= result["elapsed"] < 2.0


def test_saturated_pool_times_out_instead_of_blocking(release):
    pool = TimeoutPool(max_workers=2)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            pool.call(release.wait, (), timeout_s=0.05)
    assert pool.busy == 2
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="stuck"):
        pool.call(lambda: 1, (), timeout_s=0.2)  # both workers hung: waits its timeout, then gives up
    assert time.monotonic() - start < 2.0
    release.set()  # the hung calls return and their workers are reused
    deadline = time.monotonic() + 5
    while pool.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.call(lambda: 7, (), timeout_s=1.0) == 7


# ---- router -----------------------------------------------------------------------------------


def _rows(tasks):
    return [{"prompt": f"p{i}", "task": t, "answer": str(i), "id": i} for i, t in enumerate(tasks)]


def test_router_multi_task_each_prompt_uses_its_own_function():
    calls: dict[str, list] = {}

    def length_reward(prompts, completions, **cols):
        calls["length"] = cols
        return [float(len(c)) for c in completions]

    def first_digit(prompts, completions, answer, **cols):
        calls["digit"] = {"prompts": prompts, "answer": answer, **cols}
        return [float(c[0] == a) for c, a in zip(completions, answer)]

    router = RewardRouter({"len": length_reward, "digit": first_digit})
    tasks = ["len", "digit", "len", "digit", "digit"]
    completions = ["aaa", "1x", "b", "0", "4"]
    scores, metrics = router([f"p{i}" for i in range(5)], completions, _rows(tasks))
    assert scores.dtype == torch.float32
    assert scores.tolist() == [3.0, 1.0, 1.0, 0.0, 1.0]
    assert calls["digit"]["prompts"] == ["p1", "p3", "p4"] and calls["digit"]["answer"] == ["1", "3", "4"]
    assert calls["digit"]["task"] == ["digit"] * 3 and calls["digit"]["id"] == [1, 3, 4]
    assert calls["length"]["task"] == ["len", "len"]
    assert metrics["reward/len/mean"] == pytest.approx(2.0)
    assert metrics["reward/digit/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/failures"] == 0


def test_router_math_and_model_style_tasks_mixed():
    router = RewardRouter({"math": math_reward, "const": lambda prompts, completions, **_: [0.25] * len(prompts)})
    rows = [{"prompt": "q", "task": "math", "answer": "7"}, {"prompt": "q", "task": "const"},
            {"prompt": "q", "task": "math", "answer": "7"}]
    scores, _ = router(["q"] * 3, ["$\\boxed{7}$", "$\\boxed{7}$", "$\\boxed{8}$"], rows)
    assert scores.tolist() == [1.0, 0.25, 0.0]


def test_router_failures_are_scored_counted_and_logged(caplog, release):
    def raises(prompts, completions, **_):
        raise RuntimeError("boom")

    def hangs(prompts, completions, **_):
        release.wait()
        return [1.0] * len(completions)

    def nan_and_none(prompts, completions, **_):
        return [math.nan, None, 2.0, math.inf][: len(completions)]

    def wrong_length(prompts, completions, **_):
        return [1.0]

    fns = {"ok": lambda prompts, completions, **_: [0.5] * len(completions), "raise": raises, "hang": hangs,
           "nan": nan_and_none, "short": wrong_length}
    router = RewardRouter(fns, failure_score=-1.0, timeout_s=0.3)
    tasks = ["ok", "raise", "hang", "nan", "nan", "nan", "nan", "short", "short", "ok"]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bridgerl.rewards.router"):
        scores, m = router(["p"] * len(tasks), ["c"] * len(tasks), _rows(tasks))
        router(["p"] * len(tasks), ["c"] * len(tasks), _rows(tasks))  # second call: no new warnings
    assert time.monotonic() - start < 5.0
    assert scores.tolist() == [0.5, -1.0, -1.0, -1.0, -1.0, 2.0, -1.0, -1.0, -1.0, 0.5]
    assert m["reward/failures/exception"] == 1 and m["reward/failures/timeout"] == 1
    assert m["reward/failures/nan"] == 3 and m["reward/failures/length"] == 2
    assert m["reward/failures"] == 7
    assert m["reward/ok/mean"] == 0.5 and m["reward/raise/mean"] == -1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # once per failing task, not per call
    assert any("raises" in w and "RuntimeError: boom" in w for w in warnings)
    assert any("hangs" in w and "timeout" in w for w in warnings)


def test_router_per_function_timeout_override():
    def slow(prompts, completions, **_):
        time.sleep(0.3)
        return [1.0] * len(prompts)

    slow.reward_timeout_s = None  # trusted: no limit, runs inline
    router = RewardRouter({"slow": slow}, timeout_s=0.05)
    scores, m = router(["p"], ["c"], [{"task": "slow"}])
    assert scores.tolist() == [1.0] and m["reward/failures"] == 0
    slow.reward_timeout_s = 0.05
    _, m = router(["p"], ["c"], [{"task": "slow"}])
    assert m["reward/failures/timeout"] == 1


def test_router_task_lookup():
    router = RewardRouter({"a": lambda prompts, completions, **_: [1.0] * len(prompts),
                           "rg:*": lambda prompts, completions, **_: [2.0] * len(prompts)}, default_task="a")
    scores, _ = router(["p", "p", "p"], ["c", "c", "c"], [{"prompt": "p"}, {"task": "rg:leg_counting"}, {"task": None}])
    assert scores.tolist() == [1.0, 2.0, 1.0]
    with pytest.raises(KeyError, match=r"'zzz'.*known tasks: \['a', 'rg:\*'\]"):
        router(["p"], ["c"], [{"task": "zzz"}])
    with pytest.raises(KeyError, match="no 'task' and the router has no default_task"):
        RewardRouter({"a": len})(["p"], ["c"], [{"prompt": "p"}])
    with pytest.raises(ValueError, match="must match"):
        router(["p"], ["c", "d"], [{}])


# ---- load_callable ----------------------------------------------------------------------------


def test_load_callable(tmp_path):
    assert load_callable("bridgerl.rewards.math:math_reward") is math_reward
    assert load_callable("os.path:join") is os.path.join
    f = tmp_path / "my_reward.py"
    f.write_text("def shout(prompts, completions, **_):\n    return [float(c.isupper()) for c in completions]\n")
    fn = load_callable(f"{f}:shout")
    assert fn(prompts=["p", "p"], completions=["HI", "hi"]) == [1.0, 0.0]


def test_load_callable_errors(tmp_path):
    with pytest.raises(ImportError, match="no module named 'no_such_pkg.rewards'"):
        load_callable("no_such_pkg.rewards:fn")
    with pytest.raises(AttributeError, match="'bridgerl.rewards.math' has no attribute 'nope'"):
        load_callable("bridgerl.rewards.math:nope")
    with pytest.raises(ValueError, match="package.module:function"):
        load_callable("bridgerl.rewards.math.math_reward")
    with pytest.raises(TypeError, match="not a callable"):
        load_callable("bridgerl.rewards.math:DEFAULT_SAMPLE_TIMEOUT_S")
    with pytest.raises(ImportError, match="does not exist"):
        load_callable(f"{tmp_path / 'missing.py'}:f")
    broken = tmp_path / "broken_reward.py"
    broken.write_text("import definitely_not_installed_pkg\n")
    with pytest.raises(ImportError, match="definitely_not_installed_pkg"):
        load_callable(f"{broken}:f")


# ---- reward model -----------------------------------------------------------------------------

_WORDS = "<pad> <s> </s> <unk> user assistant : good bad answer question the is a very".split()


def _tiny_reward_model(folder, *, pad: bool, chat_template: bool, num_labels: int = 1):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>" if pad else None)
    if chat_template:
        tokenizer.chat_template = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=num_labels, pad_token_id=vocab["<pad>"] if pad else None)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pad,chat_template", [(True, True), (False, False)])
def test_reward_model_scorer_batched_equals_single(tmp_path, pad, chat_template):
    path = _tiny_reward_model(tmp_path / "rm", pad=pad, chat_template=chat_template)
    scorer = RewardModelScorer(str(path), batch_size=3)
    assert scorer.tokenizer.pad_token is not None  # eos stands in when the tokenizer has no pad token
    prompts = ["question", "the question", "question is", "a question", [{"role": "user", "content": "question"}]]
    # plain-text completions carry their leading space: without a template the text is prompt + completion
    completions = [" good", " bad bad bad very bad", " good answer", " very good answer is the answer", " bad"]
    batched = scorer(prompts=prompts, completions=completions, task=["rm"] * 5)
    assert len(batched) == 5 and all(isinstance(s, float) for s in batched)
    single = [scorer.score([p], [c])[0] for p, c in zip(prompts, completions)]
    # pooling at each row's last real token: batching (padding) does not change a score
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1
    ids = scorer.tokenizer(scorer.render(prompts[3], completions[3]))["input_ids"]
    assert "<unk>" not in scorer.tokenizer.decode(ids)

    # Independent recomputation: the head's logit at the last real token of the unpadded text.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = scorer.render(prompts[1], completions[1])
    if chat_template:
        assert " ".join(text.split()).startswith("<s> user : the question </s> <s> assistant : bad")
    ids = tokenizer(text, add_special_tokens=not chat_template, return_tensors="pt")["input_ids"]
    if not pad:  # pad = eos: a trailing eos is not pooled (see rewards/model.py)
        keep = int((ids[0] != tokenizer.eos_token_id).nonzero().max()) + 1
        ids = ids[:, :keep]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        expected = model.score(hidden)[0, -1, 0].item()
    assert batched[1] == pytest.approx(expected, abs=1e-5)


def test_reward_model_scorer_in_router_and_label_check(tmp_path):
    path = _tiny_reward_model(tmp_path / "rm", pad=True, chat_template=True)
    scorer = RewardModelScorer(str(path))
    router = RewardRouter({"chat": scorer, "math": math_reward})
    rows = [{"prompt": "question", "task": "chat"}, {"prompt": "q", "task": "math", "answer": "1"}]
    scores, m = router(["question", "q"], ["good answer", "$\\boxed{1}$"], rows)
    assert scores[0].item() == pytest.approx(scorer.score(["question"], ["good answer"])[0], abs=1e-6)
    assert scores[1].item() == 1.0 and m["reward/failures"] == 0
    two = _tiny_reward_model(tmp_path / "rm2", pad=True, chat_template=True, num_labels=2)
    with pytest.raises(ValueError, match="label_index"):
        RewardModelScorer(str(two))
    assert len(RewardModelScorer(str(two), label_index=1)(["question"], ["good"])) == 1
    with pytest.raises(OSError, match="could not load reward model"):
        RewardModelScorer(str(tmp_path / "nothing-here"))


# ---- reasoning-gym ----------------------------------------------------------------------------


def test_extract_final_answer():
    assert extract_final_answer("so <answer> 12 </answer> and <answer>13</answer>") == "13"
    assert extract_final_answer("x \\boxed{\\frac{1}{2}} then \\boxed{{a}, {b}}") == "{a}, {b}"
    assert extract_final_answer("nothing here") is None
    assert extract_final_answer("\\boxed{unclosed") is None


def test_reasoning_gym_reward_uses_dataset_scoring():
    pytest.importorskip("reasoning_gym")
    from bridgerl.data.tasks import reasoning_gym_rows

    rows = reasoning_gym_rows("leg_counting", 3, seed=0, split="train")
    entries = [r["entry"] for r in rows]
    right = [f"The total is \\boxed{{{e['answer']}}}." for e in entries]
    tagged = [f"<answer>{e['answer']}</answer>" for e in entries]
    wrong = [f"\\boxed{{{int(e['answer']) + 1}}}" for e in entries]
    assert reasoning_gym_reward(right, entry=entries) == [1.0] * 3
    assert reasoning_gym_reward(tagged, entry=entries) == [1.0] * 3
    assert all(s < 1.0 for s in reasoning_gym_reward(wrong, entry=entries))
    assert reasoning_gym_reward(["no answer"], entry=entries[:1]) == [0.0]
    router = RewardRouter({"rg:*": reasoning_gym_reward})
    scores, _ = router([r["prompt"] for r in rows], right, rows)
    assert scores.tolist() == [1.0] * 3
