"""Reference GRPOVI solvers for tests and benches (algorithms.md §3.2): the O(n²) enumeration of
Lemma-2 vertices and the literal one-pass walk. The shipped solver (bridgerl.algos.grpovi) is checked
against both; neither runs in training."""
from __future__ import annotations

import numpy as np
import torch

from bridgerl.algos.grpovi import ArrayLike, _as_array, _as_float64_tensor, _prepare, _restore


def _tie_blocks(rewards: ArrayLike, probs: ArrayLike | None, low: float | None, high: float | None):
    """Validated numpy view of one group merged into tie blocks, sorted by decreasing reward."""
    if rewards.ndim != 1:
        raise ValueError(f"expected one group (1-D), got shape {tuple(rewards.shape)}")
    r, p, lo, hi = _prepare(rewards[None], None if probs is None else _as_float64_tensor(probs, "probs")[None], low, high)
    r, p = r[0].cpu().numpy(), p[0].cpu().numpy()
    values, inverse = np.unique(-r, return_inverse=True)  # ascending in −r = descending in r
    block_p = np.bincount(inverse, weights=p, minlength=len(values))
    return -values, block_p, inverse.reshape(-1), r, p, float(lo), float(hi)


def _from_blocks(block_z: np.ndarray, inverse: np.ndarray, rewards: ArrayLike) -> ArrayLike:
    return _restore(torch.from_numpy(block_z[inverse]), rewards)


def _vertex(C: np.ndarray, c: float, lo: float, hi: float, k: int, l: int):
    """(α, f) of vertex (k, l) over blocks with prefix sums C, or None if infeasible (k < l)."""
    s_a, s_b, s_c = C[k], C[l] - C[k], C[-1] - C[l]
    if s_b <= 0:
        return None
    alpha = (c - hi * s_a - lo * s_c) / s_b
    slack = 1e-12 * max(hi - lo, 1e-300)
    if not lo - slack <= alpha <= hi + slack:
        return None
    alpha = min(max(alpha, lo), hi)
    return alpha, s_a * hi**2 + s_b * alpha**2 + s_c * lo**2


def enumerate_optimum(rewards: ArrayLike, probs: ArrayLike | None = None, low: float | None = None, high: float | None = None) -> ArrayLike:
    """Reference: the best feasible Lemma-2 vertex over all (k, l), k ≤ l, on tie blocks (O(n²), vectorised).

    Returns the vertex z in the caller's order and type (no "keep r" rule: that lives in the solver).
    """
    rewards = _as_array(rewards)
    values, block_p, inverse, _, _, lo, hi = _tie_blocks(rewards, probs, low, high)
    n_blocks = len(values)
    C = np.concatenate([[0.0], np.cumsum(block_p)])
    c = float(block_p @ values)
    slack = 1e-12 * max(hi - lo, 1e-300)
    best_f, best_k, best_l, best_alpha = -np.inf, 0, n_blocks, c
    l_all = np.arange(n_blocks + 1)
    rows = max(1, 2_000_000 // (n_blocks + 1))  # bound memory: a chunk of k rows at a time
    for k0 in range(0, n_blocks + 1, rows):
        k = np.arange(k0, min(k0 + rows, n_blocks + 1))[:, None]
        s_a, s_c = C[k], C[-1] - C[l_all][None, :]
        s_b = C[l_all][None, :] - s_a
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = (c - hi * s_a - lo * s_c) / s_b
        ok = (l_all[None, :] > k) & (s_b > 0) & (alpha >= lo - slack) & (alpha <= hi + slack)
        alpha = np.clip(np.where(ok, alpha, lo), lo, hi)
        f = np.where(ok, s_a * hi**2 + s_b * alpha**2 + s_c * lo**2, -np.inf)
        # k = l vertices (two levels, S_B = 0) need M·S_A + m·S_C = c exactly; allow rounding.
        f_two = np.where(np.abs(hi * s_a + lo * s_c - c) <= slack, s_a * hi**2 + s_c * lo**2, -np.inf)
        f = np.where(l_all[None, :] == k, f_two, f)
        i, j = np.unravel_index(np.argmax(f), f.shape)
        if f[i, j] > best_f:
            best_f, best_k, best_l, best_alpha = f[i, j], int(k[i, 0]), int(j), float(alpha[i, j])
    block_z = np.full(n_blocks, lo)
    block_z[:best_k] = hi
    block_z[best_k:best_l] = best_alpha
    return _from_blocks(block_z, inverse, rewards)


def one_pass_walk(rewards: ArrayLike, probs: ArrayLike | None = None, low: float | None = None, high: float | None = None) -> ArrayLike:
    """Reference: the literal one-pass walk of §3.2 (Python loop, ≤ n moves) on tie blocks.

    Zero-weight blocks are left out of the walk: a move across one leaves f unchanged, so the
    walk's "f strictly larger" test would stop there early. They take the value of the
    nearest weighted block above (below, at the top), which keeps f, the mean and the order.
    """
    rewards = _as_array(rewards)
    values, block_p, inverse, _, _, lo, hi = _tie_blocks(rewards, probs, low, high)
    weighted = block_p > 0
    C = np.concatenate([[0.0], np.cumsum(block_p[weighted])])
    c = float(block_p @ values)
    n_blocks = len(C) - 1
    k, l = 0, n_blocks
    current = _vertex(C, c, lo, hi, k, l)  # (0, n): α = c, always feasible
    for _ in range(n_blocks):
        best, move = current, None
        if k < l and (step := _vertex(C, c, lo, hi, k + 1, l)) and step[1] > best[1]:
            best, move = step, (k + 1, l)
        if l > k and (step := _vertex(C, c, lo, hi, k, l - 1)) and step[1] > best[1]:
            best, move = step, (k, l - 1)
        if move is None:
            break
        (k, l), current = move, best
    weighted_z = np.full(n_blocks, lo)
    weighted_z[:k] = hi
    weighted_z[k:l] = current[0]
    nearest_weighted = np.maximum(np.cumsum(weighted) - 1, 0)
    return _from_blocks(weighted_z[nearest_weighted], inverse, rewards)
