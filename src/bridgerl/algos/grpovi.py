"""GRPOVI: exact per-group reward-variance increase (algorithms.md §3).

For one group of n rewards r with weights p (π_ref over the group), bounds [m, M] and mean
c = Σ p r, solve

    max_z Σ p z²   s.t.   m ≤ z ≤ M,   Σ p z = c,   z weakly ordered like r (ties stay tied)

The optimum lies at a vertex z = (M ×k, α ×(l−k), m ×(n−l)) of Lemma 2. Sorting r in
decreasing order and writing C_j for the prefix sums of p and t = (c − m)/(M − m), a vertex
is feasible iff C_k ≤ t ≤ C_l, and its objective is, up to the constant m-shift,
(M − m)² · g with g(k, l) = C_k + (t − C_k)² / (C_l − C_k). For a fixed k, g falls as C_l
grows, so l is the first index with C_l ≥ t; with e = C_l − t and u = C_l − C_k,
g = C_l − 2e + e²/u rises with C_k, so k = l − 1. The optimum is therefore "fill the top
of the order with M until the mean is used up": z = M for blocks whose cumulative weight
ends below t, m for blocks that start at or above t, and α for the one block straddling
t. This is where the one-pass walk of §3.2 stops (tested against the walk and against
the O(n²) enumeration); it is computed here for all groups at once with a sort, a prefix
sum and elementwise selects, O(n log n) per group and no loop.

Ties: tied rewards form one block with their summed weight (the §3 caveat), so equal
rewards always get equal adjusted rewards. A group whose weighted variance cannot rise
(zero spread, binary rewards in [m, M] = [0, 1], already optimal) is returned unchanged.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]
Bound = Union[float, int, torch.Tensor, np.ndarray, None]

# A solved group replaces r only if its weighted variance rises by more than this fraction
# of (M − m)²: below it the gain is rounding noise, and keeping r exactly is what makes an
# already-optimal (e.g. binary) group come back bit-for-bit unchanged.
_GAIN_TOL = 1e-12


# ----------------------------------------------------------------------------- helpers
def _as_float64_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    try:  # a list or other sequence of numbers
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numpy array, a torch tensor or a list of numbers, got {type(x).__name__}") from err


def _as_array(x) -> ArrayLike:
    """Lists and other sequences become float64 numpy arrays; arrays and tensors pass through."""
    return x if isinstance(x, (np.ndarray, torch.Tensor)) else np.asarray(x, dtype=np.float64)


def _restore(z: torch.Tensor, like: ArrayLike) -> ArrayLike:
    """Cast the float64 result back to the caller's type; integer/bool inputs come back as float."""
    if isinstance(like, np.ndarray):
        out_dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64
        return z.cpu().numpy().astype(out_dtype, copy=False)
    out_dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return z.to(device=like.device, dtype=out_dtype)


def _bound_column(bound: Bound, fallback: torch.Tensor, name: str) -> torch.Tensor:
    """A bound as a [G, 1] float64 column: a scalar, a [G] vector, or None (the group's own min/max)."""
    if bound is None:
        return fallback
    if np.isscalar(bound):
        return torch.full_like(fallback, float(bound))
    b = _as_float64_tensor(bound, name).to(fallback.device).reshape(-1, 1)
    if b.shape[0] == 1:
        return b.expand_as(fallback)
    if b.shape[0] != fallback.shape[0]:
        raise ValueError(f"{name} must be a float or have one entry per group ({fallback.shape[0]}), got shape {tuple(b.shape)}")
    return b


def _prepare(rewards: ArrayLike, probs: ArrayLike | None, low: Bound, high: Bound):
    """Validate a [G, n] batch; return float64 (r, p normalised per row, low [G,1], high [G,1])."""
    r = _as_float64_tensor(rewards, "rewards")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf; score failed samples with a finite value before GRPOVI")
    if probs is None:
        p = torch.ones_like(r)
    else:
        p = _as_float64_tensor(probs, "probs").to(r.device)
        if p.shape != r.shape:
            raise ValueError(f"probs must have the shape of rewards {tuple(r.shape)}, got {tuple(p.shape)}")
        if not torch.isfinite(p).all() or (p < 0).any():
            raise ValueError("probs must be finite and >= 0; build them with probs_from_logps(seq_logps)")
    total = p.sum(dim=-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("every group needs probs with a positive sum")
    p = p / total
    lo = _bound_column(low, r.amin(dim=-1, keepdim=True), "low")
    hi = _bound_column(high, r.amax(dim=-1, keepdim=True), "high")
    if (lo > hi).any():
        raise ValueError("low must be <= high in every group")
    if (r < lo).any() or (r > hi).any():
        raise ValueError(
            "rewards fall outside [low, high]; pass the reward's true range, or low=None/high=None "
            "to use each group's own min and max"
        )
    return r, p, lo, hi


def _weighted_var(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    mean = (p * z).sum(dim=-1, keepdim=True)
    return (p * (z - mean) ** 2).sum(dim=-1)


def _solve(r: torch.Tensor, p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Closed-form optimum for validated float64 [G, n] inputs (p rows sum to 1).

    With t = (c − m)/(M − m), the weight that must sit at M: a tie block whose cumulative
    weight ends below t gets M, one that starts at or above t gets m, and the one block
    straddling t gets the α that keeps the mean.
    """
    # Unstable sort is fine: tied items end up with the same value whatever their order.
    r_sorted, order = torch.sort(r, dim=-1, descending=True)
    p_sorted = torch.gather(p, -1, order)
    cum = torch.cumsum(p_sorted, dim=-1)
    cum_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    # Tie blocks: a block's first item holds the weight above the block and its last item
    # the weight at or above it; cummax/cummin carry both across the block, so the block
    # is placed (M, α or m) as one unit.
    starts = torch.ones_like(r_sorted, dtype=torch.bool)
    starts[:, 1:] = r_sorted[:, 1:] != r_sorted[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    inf = torch.tensor(float("inf"), dtype=r.dtype, device=r.device)
    above = torch.where(starts, cum_before, -inf).cummax(dim=-1).values
    at_or_above = torch.where(ends, cum, inf).flip(-1).cummin(dim=-1).values.flip(-1)

    c = (p_sorted * r_sorted).sum(dim=-1, keepdim=True)
    width = hi - lo
    t = (c - lo * cum[:, -1:]) / torch.where(width > 0, width, torch.ones_like(width))
    # α = m + (M − m)(t − above)/block weight is what keeps Σ p z = c with this block at α.
    block_w = (at_or_above - above).clamp_min(torch.finfo(r.dtype).tiny)
    alpha = torch.clamp(lo + width * (t - above) / block_w, min=lo, max=hi)
    z_sorted = torch.where(at_or_above < t, hi, torch.where(above >= t, lo, alpha))
    z = torch.empty_like(z_sorted).scatter_(-1, order, z_sorted)

    # Keep r where the solve gains nothing (zero range, zero variance, already optimal).
    # With equal means, f(z) − f(r) = Σ p (z − r)(z + r − 2c): exactly 0 when z == r.
    gain = (p_sorted * (z_sorted - r_sorted) * (z_sorted + r_sorted - 2 * c)).sum(dim=-1)
    improved = (gain > _GAIN_TOL * width.squeeze(-1) ** 2) & (width.squeeze(-1) > 0)
    return torch.where(improved.unsqueeze(-1), z, r)


# ------------------------------------------------------------------------------ public
def increase_variance(rewards: ArrayLike, probs: ArrayLike | None = None, low: float | None = None, high: float | None = None) -> ArrayLike:
    """GRPOVI adjusted rewards for one group (1-D), in the caller's order, type, dtype and device.

    probs: weights over the group (normalised here; default uniform). low/high: the reward
    range [m, M] (default: the group's own min/max). Keeps the p-weighted mean and the weak
    order, ties stay tied, and takes at most 3 values; unchanged when the variance can't rise.
    """
    rewards = _as_array(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"increase_variance takes one group (1-D); got shape {tuple(rewards.shape)}, use increase_variance_groups")
    if rewards.shape[0] == 0:
        return rewards
    r, p, lo, hi = _prepare(rewards[None], None if probs is None else _as_float64_tensor(probs, "probs")[None], low, high)
    return _restore(_solve(r, p, lo, hi)[0], rewards)


def increase_variance_groups(rewards: ArrayLike, probs: ArrayLike | None = None, low: Bound = None, high: Bound = None) -> ArrayLike:
    """GRPOVI for a [G, n] batch in one vectorised call (CPU or CUDA); row g equals increase_variance(rewards[g]).

    low/high: a float, a [G] tensor, or None for each group's own min/max.
    """
    rewards = _as_array(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"increase_variance_groups takes a [G, n] batch; got shape {tuple(rewards.shape)}")
    if rewards.shape[0] == 0 or rewards.shape[1] == 0:
        return rewards
    r, p, lo, hi = _prepare(rewards, probs, low, high)
    return _restore(_solve(r, p, lo, hi), rewards)


def probs_from_logps(seq_logps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p_i = π_ref(y_i|x) / Σ_j π_ref(y_j|x) from summed sequence log-probs [G, n] (or [n]).

    Computed as a softmax over the group so it does not underflow. A temperature > 1 flattens
    the often near-one-hot result [PROPOSED]. Rows with NaN/+inf (or all −inf) fall back to 1/n.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = seq_logps.detach().to(torch.float64) / temperature
    bad = torch.isnan(x).any(dim=-1, keepdim=True) | torch.isposinf(x).any(dim=-1, keepdim=True)
    bad = bad | torch.isneginf(x).all(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(bad, torch.zeros_like(x), x), dim=-1)
    p = torch.where(bad, torch.full_like(p, 1.0 / x.shape[-1]), p)
    out_dtype = seq_logps.dtype if seq_logps.is_floating_point() else torch.get_default_dtype()
    return p.to(out_dtype)


def weighted_variance(rewards: ArrayLike, probs: ArrayLike | None = None) -> ArrayLike:
    """p-weighted variance f − c² over the last dimension (default uniform p), as float64."""
    r = _as_float64_tensor(rewards, "rewards")
    p = torch.ones_like(r) if probs is None else _as_float64_tensor(probs, "probs").to(r.device)
    var = _weighted_var(r, p / p.sum(dim=-1, keepdim=True))
    return var.cpu().numpy() if isinstance(rewards, np.ndarray) else var


def variance_increase_metrics(before: ArrayLike, after: ArrayLike, probs: ArrayLike | None = None) -> dict[str, float]:
    """Mean p-weighted group variance before/after GRPOVI, the fraction of groups it changed, and the
    fraction with any spread (a group of equal rewards has nothing to change, so on binary rewards
    `changed / with_spread` is the share of the groups VI could act on that it did act on)."""
    b = _as_float64_tensor(before, "before").reshape(-1, before.shape[-1])
    a = _as_float64_tensor(after, "after").reshape(-1, after.shape[-1]).to(b.device)
    p = None if probs is None else _as_float64_tensor(probs, "probs").reshape(b.shape).to(b.device)
    return {
        "reward/var_before": weighted_variance(b, p).mean().item(),
        "reward/var_after": weighted_variance(a, p).mean().item(),
        "reward/var_groups_changed": (a != b).any(dim=-1).double().mean().item(),
        "reward/var_groups_with_spread": (b.amax(dim=-1) > b.amin(dim=-1)).double().mean().item(),
    }


def grpovi_rewards(rewards: torch.Tensor, seq_ref_logps: torch.Tensor | None, low: torch.Tensor,
                   high: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The loop's GRPOVI step (§3.3): rewards [G, n] → adjusted rewards [G, n] and metrics.

    p is the softmax of the reference's sequence log-probs `seq_ref_logps` [G, n] (None: uniform);
    zero-spread groups may hold anything there, since they come back unchanged whatever p is.
    low/high [G] are each group's known reward range (NaN: unknown); a failure score outside it
    widens it rather than breaking the solver, and an unknown bound is the group's own min/max."""
    probs = None if seq_ref_logps is None else probs_from_logps(seq_ref_logps.cpu())
    low = torch.fmin(low, rewards.min(dim=1).values)
    high = torch.fmax(high, rewards.max(dim=1).values)
    shaped = increase_variance_groups(rewards, probs, low, high)
    return shaped, variance_increase_metrics(rewards, shaped, probs)
