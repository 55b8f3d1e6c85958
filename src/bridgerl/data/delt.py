"""DELT in a run (algorithms.md §4): `data.efficacy` in the config → scores → selected and ordered row
indices for the data stream, for RL prompts and SFT samples alike; and the scoring behind `bridgerl score`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .encoding import answer_samples, target_text
from .efficacy import align_scores, apply_efficacy, load_scores, plot_score_histogram, save_scores


def order_from_scores(eff, scores: np.ndarray, seed: int) -> np.ndarray:
    """Select (all / top_ratio / threshold) and order (shuffle / sorted / folding) by the same scores;
    `invert` flips their sign, so selection keeps, and curricula start from, the highest raw score."""
    scores = -scores if eff.invert else scores
    return apply_efficacy(scores, select=eff.select, order=eff.order, ratio=eff.ratio, threshold=eff.threshold,
                          folds=eff.folds, seed=seed)


def row_key(row: dict) -> str:
    """A stable id from a row's content, so a scores file can never silently apply to other rows."""
    text = json.dumps([row["prompt"], target_text(row)],
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def scores_from_file(path: str, rows: list[dict]) -> np.ndarray:
    """Scores written by `bridgerl score` for exactly these rows (matched by content)."""
    scores, ids = load_scores(path)
    try:
        return align_scores(scores, ids, [row_key(r) for r in rows])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path} does not score this run's rows (its ids are row-content hashes from "
                         f"`bridgerl score`; the data, its size or the seed differ): {err}") from err


def loss_based_scores(model, tokenizer, rows: list[dict]) -> np.ndarray:
    from .scorers import loss_scores, samples_from_prompt_lengths

    samples = samples_from_prompt_lengths(answer_samples(tokenizer, rows))
    return loss_scores(model, samples, pad_id=tokenizer.pad_token_id, progress=True)


def pass_rate(generator, rewarder, tokenizer, rows: list[dict], sampling, seed: int, device, n: int = 8) -> np.ndarray:
    """The seed policy's mean reward over n samples per prompt: a prompt's learnability for RL."""
    from ..rollout.types import sample_and_score
    from .encoding import PromptEncoder
    from .scorers import pass_rate_scores

    out, encode = [], PromptEncoder(tokenizer)
    rng = torch.Generator(device=device).manual_seed(seed + 11)
    for start in range(0, len(rows), 64):
        part = [dict(r, id=f"score:{start + i}") for i, r in enumerate(rows[start:start + 64])]
        _, scores, _ = sample_and_score(generator, rewarder, encode, part, n, sampling, rng)
        out.append(pass_rate_scores(scores.view(len(part), n).numpy()))
    return np.concatenate(out)


def efficacy_order(eff, rows: list[dict], seed: int, out_dir: Path, policy=None, tokenizer=None,
                   pass_rates=None) -> np.ndarray:
    """Row order for the RL prompt stream; `pass_rates()` scores the rows when `eff.scorer == pass_rate`."""
    if eff.scorer == "file":
        scores = scores_from_file(_need_file(eff), rows)
    elif eff.scorer == "loss":
        scores = loss_based_scores(policy, tokenizer, rows)
    else:
        scores = pass_rates()
    plot_score_histogram(scores, Path(out_dir) / "efficacy_scores.png")
    return order_from_scores(eff, scores, seed)


def efficacy_order_for_sft(cfg, model, tokenizer, rows: list[dict], encoded: list[tuple[list[int], int]]) -> np.ndarray:
    from .scorers import loss_scores, samples_from_prompt_lengths

    eff = cfg.data.efficacy
    if eff.scorer == "file":
        scores = scores_from_file(_need_file(eff), rows)
    elif eff.scorer == "loss":
        scores = loss_scores(model, samples_from_prompt_lengths(encoded), pad_id=tokenizer.pad_token_id)
    else:
        raise ValueError("data.efficacy.scorer=pass_rate scores RL prompts; for SFT use loss or a scores file "
                         "(e.g. LQS from `bridgerl score --scorer lqs`)")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    plot_score_histogram(scores, Path(cfg.out_dir) / "efficacy_scores.png")
    return order_from_scores(eff, scores, cfg.seed)


def lqs_for_rows(model, tokenizer, rows: list[dict], target_rows: list[dict], steps: int = 40,
                 score_every: int = 10, lr: float = 8e-3, batch_size: int = 16, seed: int = 0,
                 params=None, first_denominator: str = "one") -> np.ndarray:
    """LQS (algorithms.md §4.1) of each row against a small high-quality target set; `params` and
    `first_denominator` go to `lqs_scores` (a parameter subset; the last scored term's denominator)."""
    from .lqs import lqs_scores
    from .scorers import samples_from_prompt_lengths

    samples = samples_from_prompt_lengths(answer_samples(tokenizer, rows))
    target = samples_from_prompt_lengths(answer_samples(tokenizer, target_rows))
    result = lqs_scores(model, samples, target, steps=steps, lr=lr, batch_size=batch_size, score_every=score_every,
                        pad_id=tokenizer.pad_token_id, seed=seed, params=params,
                        first_denominator=first_denominator)
    return np.asarray(result.scores)


def lqs_target_rows(spec: str, train_rows: list[dict], size: int, seed: int) -> list[dict]:
    """A small clean target set for LQS from a built-in task: a separate draw of its train split,
    minus the rows being scored, so neither the training rows nor the held-out eval rows leak in."""
    from .tasks import builtin_rows

    taken = {r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]) for r in train_rows}
    unseen = [r for r in builtin_rows(spec, 4 * size, seed + 7919, "train") if r["prompt"] not in taken]
    if len(unseen) < size:
        raise ValueError(f"built-in task {spec!r} has too few problems outside the scored rows for an LQS target set "
                         f"of {size}; pass --target FILE.jsonl")
    return unseen[:size]


def write_scores(path: str | Path, scores: np.ndarray, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_scores(path, scores, [row_key(r) for r in rows])
    plot_score_histogram(scores, path.with_suffix(".png"))
    return path


def _need_file(eff) -> str:
    if not eff.scores_file:
        raise ValueError("data.efficacy.scorer=file needs data.efficacy.scores_file (write one with `bridgerl score`)")
    return eff.scores_file
