"""Grokking monitors from MoE routing pathways (algorithms.md §5).

Pure metrics on token-averaged routing weights `weights[N, L, K]` (samples, MoE layers,
experts) and router rows `rows[L, K, d]`, plus `PathwayMonitor`, which measures them on a
fixed probe set during training with one no-grad forward.
"""

from __future__ import annotations

import math
import time
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from bridgerl.monitor.routing import collect_routing, require_router_gates

try:  # C++ bit-parallel Levenshtein; the pure-Python bit-vector version below is the fallback.
    from rapidfuzz.distance import Levenshtein as _rf_levenshtein
    from rapidfuzz.process import cdist as _rf_cdist
except ImportError:  # pragma: no cover - exercised only where rapidfuzz is absent
    _rf_levenshtein = None
    _rf_cdist = None

Level = Literal["char", "expert"]
LEVELS = ("char", "expert")
LAYER_SEP, EXPERT_SEP = "-", ","


# ---------------------------------------------------------------- pathways (§5.2)


def kept_experts(weights: np.ndarray, tau: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Experts ranked by weight (descending, ties → lower id) and how many are kept.

    Kept = the shortest prefix whose cumulative weight exceeds `tau`, at least one expert
    (all K if the weights never exceed `tau`). Works on any leading shape: `weights[..., K]`
    → `order[..., K]`, `n_kept[...]`.
    """
    weights = np.asarray(weights, dtype=np.float64)
    order = np.argsort(-weights, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(weights, order, axis=-1), axis=-1)
    n_kept = np.minimum((cumulative <= tau).sum(axis=-1) + 1, weights.shape[-1])
    return order, n_kept


def pathway_strings(weights: np.ndarray, tau: float = 0.7) -> list[str]:
    """Pathway string per sample: kept ids comma-joined per layer, layers joined by "-"."""
    weights = np.asarray(weights)
    if weights.ndim != 3:
        raise ValueError(f"weights must be [samples, layers, experts], got shape {weights.shape}")
    order, n_kept = kept_experts(weights, tau)
    order, n_kept = order.tolist(), n_kept.tolist()
    return [
        LAYER_SEP.join(EXPERT_SEP.join(map(str, layer_order[:n])) for layer_order, n in zip(sample_order, sample_n))
        for sample_order, sample_n in zip(order, n_kept)
    ]


def pathway_tokens(pathway: str) -> list[int]:
    """Expert-level tokens of a pathway: expert ids, with -1 as the one token between layers."""
    tokens: list[int] = []
    for index, layer in enumerate(pathway.split(LAYER_SEP)):
        if index:
            tokens.append(-1)
        tokens.extend(int(e) for e in layer.split(EXPERT_SEP) if e)
    return tokens


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def _as_code_string(pathway: str, level: str) -> str:
    """One code point per edit unit: chars as they are, or one per expert/layer boundary.

    Encoding each expert id as a single code point makes a character Levenshtein over the
    result equal the token-level Levenshtein, so both levels share one fast kernel.
    """
    _check_level(level)
    if level == "char":
        return pathway
    return "".join(chr(token + 1) for token in pathway_tokens(pathway))  # separator -1 → chr(0)


# ---------------------------------------------------------------- edit distance


def _pattern_masks(pattern: str) -> dict[str, int]:
    masks: dict[str, int] = {}
    for position, unit in enumerate(pattern):
        masks[unit] = masks.get(unit, 0) | (1 << position)
    return masks


def _levenshtein_bitparallel(pattern: str, text: str, masks: dict[str, int] | None = None) -> int:
    """Levenshtein distance by Myers' bit-vector algorithm (Hyyrö's global-distance form).

    One DP column lives in the bits of Python ints, so each character of `text` costs a
    dozen integer operations however long `pattern` is: O(len(text)) Python steps per pair
    instead of the O(len(text)·len(pattern)) of a cell-by-cell DP.
    """
    length = len(pattern)
    if length == 0:
        return len(text)
    masks = masks if masks is not None else _pattern_masks(pattern)
    full, top = (1 << length) - 1, 1 << (length - 1)
    plus, minus, score = full, 0, length  # vertical deltas of the first column are all +1
    for unit in text:
        match = masks.get(unit, 0)
        vertical = match | minus
        horizontal = (((match & plus) + plus) ^ plus) | match
        h_plus = minus | (~(horizontal | plus) & full)
        h_minus = plus & horizontal
        if h_plus & top:
            score += 1
        elif h_minus & top:
            score -= 1
        h_plus = ((h_plus << 1) | 1) & full  # row 0 of a global alignment grows by 1 per column
        h_minus = (h_minus << 1) & full
        plus = h_minus | (~(vertical | h_plus) & full)
        minus = h_plus & vertical
    return score


def _pairwise_bitparallel(strings: Sequence[str]) -> np.ndarray:
    masks = [_pattern_masks(s) for s in strings]
    n = len(strings)
    matrix = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(i + 1, n):
            # The loop runs over the shorter string; the longer one lives in the bit vectors.
            p, t = (i, j) if len(strings[i]) >= len(strings[j]) else (j, i)
            matrix[i, j] = matrix[j, i] = _levenshtein_bitparallel(strings[p], strings[t], masks[p])
    return matrix


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "rapidfuzz", "bitparallel"):
        raise ValueError(f"backend must be 'auto', 'rapidfuzz' or 'bitparallel', got {backend!r}")
    if backend == "auto":
        return "rapidfuzz" if _rf_cdist is not None else "bitparallel"
    if backend == "rapidfuzz" and _rf_cdist is None:
        raise ValueError("backend='rapidfuzz' needs `pip install rapidfuzz`; or use backend='bitparallel'.")
    return backend


def pathway_distance(a: str, b: str, level: Level = "char", backend: str = "auto") -> int:
    """Levenshtein distance between two pathway strings, over characters or expert ids."""
    a_code, b_code = _as_code_string(a, level), _as_code_string(b, level)
    if _resolve_backend(backend) == "rapidfuzz":
        return int(_rf_levenshtein.distance(a_code, b_code))
    longer, shorter = (a_code, b_code) if len(a_code) >= len(b_code) else (b_code, a_code)
    return _levenshtein_bitparallel(longer, shorter)


def pairwise_distances(pathways: Sequence[str], level: Level = "char", backend: str = "auto") -> np.ndarray:
    """Symmetric [N, N] matrix of pathway edit distances."""
    codes = [_as_code_string(p, level) for p in pathways]
    if _resolve_backend(backend) == "rapidfuzz":
        return np.asarray(_rf_cdist(codes, codes, scorer=_rf_levenshtein.distance, dtype=np.int64))
    return _pairwise_bitparallel(codes)


def group_distance(pathways: Sequence[str], level: Level = "char", backend: str = "auto") -> float:
    """Mean distance over all unordered pairs (§5.2 group metric); NaN for fewer than 2 samples."""
    n = len(pathways)
    if n < 2:
        return float("nan")
    matrix = pairwise_distances(pathways, level, backend)
    return float(matrix[np.triu_indices(n, k=1)].mean())


def layer_group_distances(weights: np.ndarray, tau: float = 0.7, level: Level = "char") -> np.ndarray:
    """Group distance of each MoE layer's own pathway segment → [L]."""
    weights = np.asarray(weights)
    layers = range(weights.shape[1])
    return np.array([group_distance(pathway_strings(weights[:, layer : layer + 1], tau), level) for layer in layers])


# ---------------------------------------------------------------- consistency (§5.3)


def routing_embeddings(weights: np.ndarray, router_rows: np.ndarray) -> np.ndarray:
    """e_{i,ℓ} = Σ_k ḡ_ℓ(i,k)·v_{ℓk}: weights [N, L, K], rows [L, K, d] → [N, L, d]."""
    return np.einsum("nlk,lkd->nld", np.asarray(weights, np.float64), np.asarray(router_rows, np.float64))


def adjacent_cosines(embeddings: np.ndarray) -> np.ndarray:
    """c_ℓ = cos(e_ℓ, e_{ℓ+1}) per sample: [N, L, d] → [N, L−1], clipped to [−1, 1]."""
    left, right = embeddings[:, :-1], embeddings[:, 1:]
    norms = np.linalg.norm(left, axis=-1) * np.linalg.norm(right, axis=-1)
    cos = (left * right).sum(-1) / np.maximum(norms, np.finfo(np.float64).tiny)
    return np.clip(cos, -1.0, 1.0)


def consistency(weights: np.ndarray, router_rows: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """C_i = 1 − mean_ℓ c_ℓ / (max_ℓ c_ℓ + ε) per sample, and the cosines c [N, L−1].

    Smoothness is S = 1 − C. With L = 2 MoE layers there is one cosine and C ≡ 0 by
    construction, so the metric needs L ≥ 3 to carry information. The spec's division by
    max_ℓ c_ℓ is kept as written; where that max is near 0 or negative (typical at
    initialisation) C swings widely, and the plain mean of `c` is the steadier signal.
    """
    if np.asarray(weights).shape[1] < 2:
        raise ValueError("consistency needs at least 2 MoE layers (it compares adjacent layers).")
    cos = adjacent_cosines(routing_embeddings(weights, router_rows))
    c_value = 1.0 - (cos / (cos.max(axis=1, keepdims=True) + eps)).mean(axis=1)
    return c_value, cos


def pathway_metrics(
    weights: np.ndarray,
    router_rows: np.ndarray,
    tau: float = 0.7,
    level: Level = "char",
    per_layer: bool = True,
    prefix: str = "pathways/",
) -> dict[str, float]:
    """All group metrics for one probe set, with names ready for a logger."""
    weights = np.asarray(weights, np.float64)
    _, n_kept = kept_experts(weights, tau)
    metrics = {
        f"{prefix}distance": group_distance(pathway_strings(weights, tau), level),
        f"{prefix}kept_experts": float(n_kept.mean()),
    }
    if weights.shape[1] >= 2:
        c_value, cos = consistency(weights, router_rows)
        metrics[f"{prefix}consistency"] = float(c_value.mean())
        metrics[f"{prefix}smoothness"] = float(1.0 - c_value.mean())
        metrics[f"{prefix}layer_cosine"] = float(cos.mean())
    if per_layer:
        for layer, value in enumerate(layer_group_distances(weights, tau, level)):
            metrics[f"{prefix}layer_{layer:02d}/distance"] = float(value)
        if weights.shape[1] >= 2:
            for layer, value in enumerate(cos.mean(axis=0)):
                metrics[f"{prefix}layer_{layer:02d}/cosine_next"] = float(value)
    return metrics


# ---------------------------------------------------------------- memorisation (§5.1)


def memorisation_times(losses: np.ndarray, epsilon: float, delta: float = 0.05) -> np.ndarray:
    """t*_i for a loss matrix [checkpoints, samples]; −1 where a sample is never memorised.

    t*_i is the earliest checkpoint t such that at t and every later checkpoint t′,
    ℓ_i(θ_t′) ≤ ε and |ℓ_i(θ_t′) − ℓ_i(θ_T)| ≤ δ.
    """
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 2 or losses.shape[0] == 0:
        raise ValueError(f"losses must be [checkpoints, samples] with ≥1 checkpoint, got {losses.shape}")
    holds = (losses <= epsilon) & (np.abs(losses - losses[-1]) <= delta)
    holds_from_here = np.flip(np.logical_and.accumulate(np.flip(holds, 0), axis=0), 0)
    first = holds_from_here.argmax(axis=0)
    return np.where(holds_from_here[-1], first, -1)


def choose_epsilon(losses: np.ndarray, target_fraction: float = 0.225) -> float:
    """ε such that ⌈target·N⌉ samples count as memorised (more only on ties).

    At the final checkpoint the δ condition holds trivially, so a sample is memorised
    exactly when its final loss is ≤ ε; ε is therefore a quantile of the final losses.
    """
    if not 0.0 < target_fraction <= 1.0:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    final = np.sort(np.asarray(losses, np.float64)[-1])
    count = min(max(math.ceil(target_fraction * len(final)), 1), len(final))
    return float(final[count - 1])


# ---------------------------------------------------------------- live monitor


class PathwayMonitor:
    """Pathway metrics of a fixed probe set, measured live during training.

    `measure(model)` runs one no-grad forward over the probe set with router hooks and
    returns `pathways/distance`, `pathways/consistency`, `pathways/smoothness`,
    `pathways/layer_cosine`, `pathways/kept_experts`, per-layer values and the time it took.
    Dense models raise `ValueError` (the monitor needs an MoE policy).
    """

    def __init__(
        self,
        probe_input_ids: torch.Tensor,
        probe_attention_mask: torch.Tensor | None = None,
        tau: float = 0.7,
        level: Level = "char",
        batch_size: int = 64,
        per_layer: bool = True,
    ):
        _check_level(level)
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {tau}")
        if probe_input_ids.dim() != 2 or probe_input_ids.shape[0] < 2:
            raise ValueError("probe_input_ids must be [samples ≥ 2, tokens]; the distance compares pairs of samples.")
        self.input_ids = probe_input_ids
        if probe_attention_mask is None:
            probe_attention_mask = torch.ones_like(probe_input_ids)
        self.attention_mask = probe_attention_mask
        self.tau, self.level, self.batch_size, self.per_layer = tau, level, batch_size, per_layer

    def routing(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Token-averaged weights [N, L, K] and router rows [L, K, d] of the probe set."""
        gates = require_router_gates(model)
        weights, rows = collect_routing(model, self.input_ids, self.attention_mask, self.batch_size, gates)
        return weights.numpy(), rows.numpy()

    def measure(self, model: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        weights, rows = self.routing(model)
        metrics = pathway_metrics(weights, rows, self.tau, self.level, self.per_layer)
        metrics["pathways/measure_seconds"] = time.perf_counter() - start
        return metrics
