"""bench/efficacy.py's data: distinct rows across the level mix (the 'ids must be unique' crash) and the
corrupted-target quality axis with its AUC check."""
import re

import numpy as np
import pytest
from conftest import load_bench

from bridgerl.data.efficacy import save_scores
from bridgerl.data.delt import row_key
from bridgerl.rewards.math import math_reward


@pytest.fixture(scope="module")
def bench():
    return load_bench("efficacy")


def test_the_default_level_mix_has_distinct_rows_and_score_ids(bench, tmp_path):
    rows = bench.level_rows(["tiny", "easy"], 2000, bench.DATA_SEED, "train")
    assert len(rows) == 4000 and len({r["prompt"] for r in rows}) == 4000
    save_scores(tmp_path / "s.jsonl", np.arange(len(rows), dtype=float), [row_key(r) for r in rows])  # raised before
    other = bench.level_rows(["tiny", "easy"], 100, bench.PROXY_SEED, "train", {r["prompt"] for r in rows})
    assert not {r["prompt"] for r in other} & {r["prompt"] for r in rows}


def test_corrupted_rows_have_wrong_targets_and_the_rest_stay_right(bench):
    rows = bench.level_rows(["tiny", "easy"], 50, 0, "train")
    out, bad = bench.corrupt_rows(rows, 0.3, 0)
    assert bad.sum() == 30
    for row, corrupt in zip(out, bad):
        boxed = re.search(r"\\boxed\{(-?\d+)\}", row["completion"]).group(1)
        assert math_reward([row["completion"]], answer=[row["answer"]])[0] == (0.0 if corrupt else 1.0)
        assert (boxed != row["answer"]) == corrupt and int(boxed) >= 0


def test_auc_is_the_share_of_pairs_ranked_the_right_way(bench):
    assert bench.auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert bench.auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert bench.auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert bench.auc(np.array([1.0]), np.array([1.0])) == 0.5


def test_swap_and_random_text_corruptions_give_wrong_targets_and_unknown_kinds_fail(bench):
    rows = bench.level_rows(["tiny", "easy"], 50, 0, "train")
    for kind in ("swap", "random_text"):
        out, bad = bench.corrupt_rows(rows, 0.3, 0, kind)
        assert bad.sum() == 30
        for row, new, corrupt in zip(rows, out, bad):
            assert (new["completion"] != row["completion"]) == corrupt
            assert math_reward([new["completion"]], answer=[row["answer"]])[0] == (0.0 if corrupt else 1.0)
            if corrupt and kind == "swap":  # another row's well-formed solution
                assert new["completion"] in {r["completion"] for r in rows}
    with pytest.raises(ValueError, match="swap"):
        bench.corrupt_rows(rows, 0.3, 0, "typo")


def test_lqs_for_rows_passes_the_parameter_subset_and_denominator_on(tmp_path):
    import torch

    from bridgerl.data.delt import lqs_for_rows
    from bridgerl.data.encoding import answer_samples
    from bridgerl.data.lqs import lqs_scores
    from bridgerl.data.scorers import samples_from_prompt_lengths
    from bridgerl.data.tasks import builtin_rows
    from bridgerl.models import load_causal_lm, load_tokenizer, make_tiny_model

    torch.set_num_threads(1)
    path = make_tiny_model(tmp_path / "m", "llama", "nano", seed=0)
    tok, model = load_tokenizer(str(path)), load_causal_lm(str(path))
    rows = [dict(r, completion=r["solution"]) for r in builtin_rows("arithmetic:tiny", 12, 0, "train")]
    target = [dict(r, completion=r["solution"]) for r in builtin_rows("arithmetic:tiny", 4, 5, "train")]
    kw = dict(steps=4, score_every=2, lr=0.05, batch_size=4, seed=0)
    sub = lqs_for_rows(model, tok, rows, target, params=["model.layers.1"], first_denominator="final_norm", **kw)
    ref = lqs_scores(model, samples_from_prompt_lengths(answer_samples(tok, rows)),
                     samples_from_prompt_lengths(answer_samples(tok, target)), params=["model.layers.1"],
                     first_denominator="final_norm", pad_id=tok.pad_token_id, progress=False, **kw)
    np.testing.assert_allclose(sub, ref.scores, rtol=1e-6, atol=1e-8)
    assert not np.allclose(sub, lqs_for_rows(model, tok, rows, target, **kw))  # the defaults differ
