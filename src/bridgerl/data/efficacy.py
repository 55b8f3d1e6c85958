"""DELT data efficacy: selection and ordering from one score per sample (algorithms.md §4.2).

Everything here is a pure function of a score array and returns index arrays (numpy int64) into
the original data, so the data stream can apply them to any indexable dataset. Scores come from
`bridgerl.data.lqs` (LQS), `bridgerl.data.scorers` (loss, pass rate, learned head) or a file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

SelectRule = Literal["all", "top_k", "top_ratio", "threshold"]
OrderRule = Literal["shuffle", "sorted", "folding", "none"]


def _as_scores(scores) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"scores must be one number per sample (1-D), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise ValueError(f"scores contain NaN/inf at indices {bad}; rescore those samples or drop them first")
    return arr


# ---------------------------------------------------------------- orderings (permutations of range(n))

def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The conventional baseline: a seeded uniform permutation of range(n)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def sorted_order(scores, descending: bool = False) -> np.ndarray:
    """Indices sorting the scores (ascending curriculum by default). Stable: ties keep input order."""
    arr = _as_scores(scores)
    # Negating (rather than reversing) keeps equal scores in input order when descending too.
    return np.argsort(-arr if descending else arr, kind="stable").astype(np.int64)


def fold_order(scores, folds: int = 3) -> np.ndarray:
    """Folding (§4.2): sort ascending to a_0..a_{n-1}, then emit a_j, a_{j+L}, ... for j = 0..L-1.

    Each fold is an ascending strided sub-sample of the whole score range, so the curriculum
    repeats L times. Fold j holds ceil((n - j) / L) items; L = 1 is the plain ascending sort.
    """
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    ascending = sorted_order(scores)
    return np.concatenate([ascending[j::folds] for j in range(folds)]).astype(np.int64)


# ---------------------------------------------------------------- selection (kept indices, ascending)

def select_top_k(scores, k: int) -> np.ndarray:
    """Indices of the k highest scores, returned in ascending index order.

    Ties at the cut keep the earlier sample, so the result is deterministic.
    """
    arr = _as_scores(scores)
    if not 0 <= k <= arr.size:
        raise ValueError(f"k must be in [0, {arr.size}] for {arr.size} samples, got {k}")
    best_first = np.argsort(-arr, kind="stable")
    return np.sort(best_first[:k]).astype(np.int64)


def top_ratio_count(n: int, ratio: float) -> int:
    """K = floor(ratio * n); the 1e-9 guards against 0.29 * 100 = 28.999999999999996."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return min(n, int(math.floor(ratio * n + 1e-9)))


def select_top_ratio(scores, ratio: float) -> np.ndarray:
    """Keep the top K = floor(ratio * n) samples (ratio = 1 keeps all)."""
    arr = _as_scores(scores)
    return select_top_k(arr, top_ratio_count(arr.size, ratio))


def select_threshold(scores, tau: float) -> np.ndarray:
    """Keep samples with score strictly above tau (the reference code's rule γ > τ)."""
    return np.flatnonzero(_as_scores(scores) > tau).astype(np.int64)


def apply_efficacy(
    scores,
    select: SelectRule = "all",
    order: OrderRule = "folding",
    *,
    ratio: float = 1.0,
    k: int | None = None,
    threshold: float = 0.0,
    folds: int = 3,
    seed: int = 0,
    descending: bool = False,
) -> np.ndarray:
    """Select, then order the kept samples by the same scores. Returns indices into `scores`.

    select: all | top_k (needs k) | top_ratio (ratio) | threshold (keeps score > threshold).
    order:  shuffle (seeded) | sorted (ascending unless descending) | folding (folds) | none.
    """
    arr = _as_scores(scores)
    if select == "all":
        kept = np.arange(arr.size, dtype=np.int64)
    elif select == "top_k":
        if k is None:
            raise ValueError("select='top_k' needs k=<number of samples to keep>")
        kept = select_top_k(arr, k)
    elif select == "top_ratio":
        kept = select_top_ratio(arr, ratio)
    elif select == "threshold":
        kept = select_threshold(arr, threshold)
    else:
        raise ValueError(f"unknown select rule {select!r}; use all, top_k, top_ratio or threshold")

    sub = arr[kept]
    if order == "shuffle":
        perm = shuffle_order(sub.size, seed)
    elif order == "sorted":
        perm = sorted_order(sub, descending=descending)
    elif order == "folding":
        perm = fold_order(sub, folds)
    elif order == "none":
        perm = np.arange(sub.size, dtype=np.int64)
    else:
        raise ValueError(f"unknown order {order!r}; use shuffle, sorted, folding or none")
    return kept[perm]


# ---------------------------------------------------------------- normalisation and statistics

def zscore_clip(scores, clip: float = 3.0) -> np.ndarray:
    """z-score then clip to [-clip, clip], as the reference code normalises LQS before training the scorer.

    Constant scores (std 0) carry no ranking information and map to all zeros. Clipping moves the
    mean/std slightly off 0/1 when some |z| > clip; with n <= clip**2 + 1 samples no |z| can exceed clip.
    """
    arr = _as_scores(scores)
    std = arr.std()
    if arr.size == 0 or std == 0:
        return np.zeros_like(arr)
    return np.clip((arr - arr.mean()) / std, -clip, clip)


def rank_average(values) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (what Spearman needs)."""
    arr = np.asarray(values, dtype=np.float64)
    order = np.argsort(arr, kind="stable")
    ranks = np.empty(arr.size, dtype=np.float64)
    ranks[order] = np.arange(arr.size, dtype=np.float64)
    # Average within runs of equal values: group sorted values, mean rank per group.
    _, group, counts = np.unique(arr[order], return_inverse=True, return_counts=True)
    sums = np.bincount(group, weights=ranks[order])
    ranks[order] = (sums / counts)[group]
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation; 0.0 when either side is constant (no ranking to compare)."""
    ra, rb = rank_average(a), rank_average(b)
    if ra.size != rb.size:
        raise ValueError(f"spearman needs equal lengths, got {ra.size} and {rb.size}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


# ---------------------------------------------------------------- scores files

def save_scores(path: str | Path, scores, ids: Sequence | None = None) -> Path:
    """Write scores with their sample ids. `.jsonl`: one {"id", "score"} per line; `.npy`: the
    scores, plus the ids as JSON in `<path>.ids.json`. ids default to 0..n-1."""
    path = Path(path)
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    ids = list(range(arr.size)) if ids is None else [_plain_id(i) for i in ids]
    if len(ids) != arr.size:
        raise ValueError(f"{len(ids)} ids for {arr.size} scores; give one id per score")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique so scores can be matched back to samples")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, arr)
        Path(str(path) + ".ids.json").write_text(json.dumps(ids))
    elif path.suffix == ".jsonl":
        with path.open("w") as f:
            for i, s in zip(ids, arr.tolist()):
                f.write(json.dumps({"id": i, "score": s}) + "\n")
    else:
        raise ValueError(f"scores file {path} must end in .jsonl or .npy")
    return path


def load_scores(path: str | Path) -> tuple[np.ndarray, list]:
    """Read a file written by `save_scores` (or any JSONL with "id" and "score" per row)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"scores file {path} does not exist; write it with bridgerl.data.efficacy.save_scores")
    if path.suffix == ".npy":
        arr = np.load(path).astype(np.float64).reshape(-1)
        ids_path = Path(str(path) + ".ids.json")
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else list(range(arr.size))
        if len(ids) != arr.size:
            raise ValueError(f"{ids_path} has {len(ids)} ids but {path} has {arr.size} scores")
        return arr, ids
    ids, scores = [], []
    with path.open() as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} row {row}: not valid JSON ({e})") from None
            for field in ("id", "score"):
                if field not in rec:
                    raise ValueError(f"{path} row {row}: missing field {field!r}")
            ids.append(rec["id"])
            scores.append(float(rec["score"]))
    return np.asarray(scores, dtype=np.float64), ids


def align_scores(scores, ids: Sequence, dataset_ids: Sequence) -> np.ndarray:
    """Scores in the order of `dataset_ids`; every dataset id must have a score."""
    lookup = dict(zip((_plain_id(i) for i in ids), np.asarray(scores, dtype=np.float64).tolist()))
    missing = [i for i in dataset_ids if _plain_id(i) not in lookup]
    if missing:
        raise KeyError(f"{len(missing)} samples have no score (first: {missing[:3]}); rescore the dataset "
                       "or check that the scores file matches data.train")
    return np.asarray([lookup[_plain_id(i)] for i in dataset_ids], dtype=np.float64)


def _plain_id(i):
    """numpy ints/strs -> Python builtins, so ids round-trip through JSON and compare equal."""
    return i.item() if isinstance(i, np.generic) else i


def plot_score_histogram(scores, path: str | Path, bins: int = 50, title: str = "score distribution") -> Path:
    """Save a histogram of the scores as a PNG (matplotlib Agg backend, no display needed)."""
    # An Agg canvas on a bare Figure: no pyplot, so the global backend of the caller is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(arr, bins=bins, color="#3b6ea8")
    ax.set_xlabel("score")
    ax.set_ylabel("samples")
    ax.set_title(f"{title} (n={arr.size}, mean={arr.mean():.3g}, std={arr.std():.3g})" if arr.size else title)
    fig.tight_layout()
    fig.savefig(path)
    return path
