"""Learnability-Quality Scoring (LQS, algorithms.md §4.1) on any HF causal LM, with torch.func.

Pipeline (names as in §4.1):
1. Proxy run: T plain-SGD steps θ_{t+1} = θ_t − η ∇L_{B_t}(θ_t) on the training samples, where
   L_{B_t} is the mean loss of step t's mini-batch (uniform γ). Parameter snapshots are kept only at
   scored steps t ≡ 0 (mod score_every); the steps in between are replayed from them on the way back.
2. Reverse pass: λ_T = ∇J(θ_T) and λ_t = λ_{t+1} + ∇J(θ_t) − η H_t λ_{t+1}, with J the mean loss on the
   high-quality target set and H_t the Hessian of L_{B_t} at θ_t (the exact adjoint of the SGD step
   that was taken; with batch_size >= n this is the mean loss over all the proxy data).
   H_t λ is a Hessian-vector product, forward-over-reverse `jvp(grad(L))`.
3. At each scored step t: per-sample gradients g_{n,t} (`vmap(grad(ℓ))`, chunked), and
   γ_n += η λ_{t+1}ᵀ g_{n,t} / ‖g_{n,t'}‖, with t' the next scored step (see `lqs_gamma`).
4. z-score and clip to [−3, 3] (`efficacy.zscore_clip`), as the reference code does.

The user's model is never modified: all parameters travel as dicts through `functional_call`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import grad, grad_and_value, jvp, vmap
from tqdm.auto import tqdm

from bridgerl.data.efficacy import zscore_clip
from bridgerl.data.scorers import (
    ParamSelector,
    TokenBatch,
    _chunks,
    make_loss_fns,
    scoring_mode,
    split_params,
    to_token_batch,
)

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------- the γ formula (pure)

def lqs_gamma(dots: torch.Tensor, norms: torch.Tensor, final_norms: torch.Tensor | None = None,
              lr: float = 1.0) -> torch.Tensor:
    """γ_n = η Σ_s λ_{s+1}ᵀ g_{n,s} / ‖g_{n,s+1}‖ over scored steps s (rows in time order).

    dots [S, N]: λ_{t_s+1}ᵀ g_{n,t_s}; norms [S, N]: ‖g_{n,t_s}‖. The denominator of row s is the
    gradient norm at the next scored step, row s+1. The last row has no next scored step:
      final_norms=None    -> denominator 1 (the reference code's convention, §4.1 step 2);
      final_norms [N]     -> ‖g_{n,T}‖ at the final proxy checkpoint, which makes every term a ratio,
                             so scaling one sample's gradients by c > 0 leaves γ_n unchanged (§6).
    A zero denominator (a sample with zero gradient) contributes 0.
    """
    if dots.shape != norms.shape or dots.ndim != 2:
        raise ValueError(f"dots and norms must both be [S, N], got {tuple(dots.shape)} and {tuple(norms.shape)}")
    last = torch.ones_like(norms[:1]) if final_norms is None else final_norms.reshape(1, -1).to(norms)
    denominators = torch.cat([norms[1:], last])
    safe = torch.where(denominators > 0, denominators, torch.ones_like(denominators))
    terms = torch.where(denominators > 0, dots / safe, torch.zeros_like(dots))
    return lr * terms.sum(0)


# ---------------------------------------------------------------- gradient primitives

def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _axpy(alpha: float, x: Params, y: Params) -> Params:
    """y + alpha * x, key by key."""
    return {k: y[k] + alpha * x[k] for k in y}


def _norm(p: Params) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in p.values())))


def _mean_grad(batch_loss, theta: Params, data: TokenBatch, chunk_size: int) -> tuple[Params, float]:
    """∇ of the mean loss over all of `data`, in chunks so memory stays bounded."""
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    loss_sum = 0.0
    for idx in _chunks(len(data), chunk_size):
        b = data.take(idx)
        g, loss = grad_and_value(batch_loss)(theta, b.ids, b.mask)
        w = idx.numel() / len(data)
        total = {k: total[k] + w * g[k] for k in total}
        loss_sum += w * float(loss)
    return total, loss_sum


def hessian_vector_product(batch_loss, theta: Params, data: TokenBatch, vec: Params, chunk_size: int = 16,
                           mode: Literal["fwdrev", "revrev"] = "fwdrev") -> Params:
    """H v for H the Hessian of the mean loss over `data` at θ.

    fwdrev: jvp(grad(L)) — one forward-mode pass through the backward, the cheapest exact HVP.
    revrev: grad(⟨grad(L), v⟩) — double backward, for models whose ops lack forward-mode AD.
    """
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for idx in _chunks(len(data), chunk_size):
        b = data.take(idx)

        def g(p, b=b):
            return grad(batch_loss)(p, b.ids, b.mask)

        if mode == "fwdrev":
            hv = jvp(g, (theta,), (vec,))[1]
        else:
            hv = grad(lambda p: _dot(g(p), vec))(theta)
        w = idx.numel() / len(data)
        total = {k: total[k] + w * hv[k] for k in total}
    return total


def per_sample_grads(sample_loss, theta: Params, data: TokenBatch) -> Params:
    """{name: [N, *shape]} gradients of each sample's own loss (no chunking; see per_sample_grad_stats)."""
    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(theta, data.ids, data.mask)


def per_sample_grad_stats(sample_loss, theta: Params, data: TokenBatch, lam: Params | None,
                          chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(λᵀ g_n [N], ‖g_n‖ [N]) without ever holding more than chunk_size per-sample gradients."""
    n = len(data)
    dots = torch.zeros(n, dtype=torch.float64)
    norms = torch.zeros(n, dtype=torch.float64)
    for idx in _chunks(n, chunk_size):
        g = per_sample_grads(sample_loss, theta, data.take(idx))
        sq = sum(v.flatten(1).double().pow(2).sum(1) for v in g.values())
        norms[idx] = sq.sqrt().cpu()
        if lam is not None:
            dots[idx] = sum(v.flatten(1).double() @ lam[k].flatten().double() for k, v in g.items()).cpu()
    return dots, norms


# ---------------------------------------------------------------- the proxy run and its adjoint

@dataclass
class LQSResult:
    scores: np.ndarray  # [N] z-scored and clipped to [-3, 3]: what selection/ordering consume
    raw: np.ndarray  # [N] γ before normalisation
    scored_steps: list[int]  # proxy steps t at which per-sample gradients were taken
    metrics: dict = field(default_factory=dict)  # train/target losses, ‖λ‖ per scored step, timings


def proxy_batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, B] sample indices: epoch-wise seeded permutations, like a shuffled drop-last loader."""
    b = min(batch_size, n)
    per_epoch = n // b
    rng = np.random.default_rng(seed)
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(n)[: per_epoch * b].reshape(per_epoch, b) for _ in range(epochs)]
    return np.concatenate(rows)[:steps]


def lqs_scores(
    model: nn.Module,
    samples,  # the data to score (see scorers module doc); also the proxy-run data unless train_samples
    target_samples,  # small high-quality set defining J
    *,
    steps: int = 100,
    lr: float = 8e-3,
    batch_size: int = 16,
    score_every: int = 10,
    train_samples=None,
    params: ParamSelector = None,
    chunk_size: int = 16,
    first_denominator: Literal["one", "final_norm"] = "one",
    hvp_mode: Literal["auto", "fwdrev", "revrev"] = "auto",
    pad_id: int = 0,
    max_length: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LQSResult:
    """Score every sample with LQS (§4.1). Defaults are the paper's proxy run (T=100, η=0.008, batch 16,
    scores accumulated every 10 steps); `params` restricts everything (the proxy run included) to a
    parameter subset — names, name prefixes or a predicate — which keeps the adjoint exact and cheap.

    first_denominator: "one" follows the reference code; "final_norm" divides the last scored term by
    ‖g_{n,T}‖ so γ_n is invariant to rescaling a sample's gradients (see `lqs_gamma`).
    """
    if steps < 1 or score_every < 1:
        raise ValueError(f"steps and score_every must be >= 1, got {steps} and {score_every}")
    if first_denominator not in ("one", "final_norm"):
        raise ValueError(f"first_denominator must be 'one' or 'final_norm', got {first_denominator!r}")
    data = to_token_batch(samples, pad_id, max_length)
    train = data if train_samples is None else to_token_batch(train_samples, pad_id, max_length)
    target = to_token_batch(target_samples, pad_id, max_length)
    schedule = proxy_batch_schedule(len(train), batch_size, steps, seed)
    timings = {"forward_s": 0.0, "replay_s": 0.0, "target_grad_s": 0.0, "hvp_s": 0.0, "sample_grads_s": 0.0}

    with scoring_mode(model):
        theta0, frozen = split_params(model, params)
        device = next(iter(theta0.values())).device
        data, train, target = (_to(x, device) for x in (data, train, target))
        batch_loss, sample_loss = make_loss_fns(model, frozen)
        mode = hvp_mode

        def sgd_step(theta: Params, t: int) -> tuple[Params, float]:
            b = train.take(torch.as_tensor(schedule[t]))
            g, loss = grad_and_value(batch_loss)(theta, b.ids, b.mask)
            return _axpy(-lr, g, theta), float(loss)

        # Forward: keep θ only at scored steps (segment starts) plus θ_T.
        clock = time.perf_counter()
        snapshots, train_losses, theta = {}, [], theta0
        for t in tqdm(range(steps), desc="LQS proxy run", disable=not progress):
            if t % score_every == 0:
                snapshots[t] = theta
            theta, loss = sgd_step(theta, t)
            train_losses.append(loss)
        theta_final = theta
        timings["forward_s"] = time.perf_counter() - clock

        lam, target_loss_final = _mean_grad(batch_loss, theta_final, target, chunk_size)
        final_norms = None
        if first_denominator == "final_norm":
            final_norms = per_sample_grad_stats(sample_loss, theta_final, data, None, chunk_size)[1]
        dots, norms, lam_norms = {}, {}, {}
        bar = tqdm(total=steps, desc="LQS reverse pass", disable=not progress)
        for start in sorted(snapshots, reverse=True):
            end = min(start + score_every, steps)
            clock = time.perf_counter()
            thetas = [snapshots.pop(start)]  # replay θ_start .. θ_{end-1} from the snapshot
            for t in range(start, end - 1):
                thetas.append(sgd_step(thetas[-1], t)[0])
            timings["replay_s"] += time.perf_counter() - clock
            for t in range(end - 1, start - 1, -1):
                theta_t = thetas.pop()
                if t == start:  # a scored step: contribution uses λ_{t+1}, before this step's update
                    clock = time.perf_counter()
                    dots[t], norms[t] = per_sample_grad_stats(sample_loss, theta_t, data, lam, chunk_size)
                    lam_norms[t] = _norm(lam)
                    timings["sample_grads_s"] += time.perf_counter() - clock
                clock = time.perf_counter()
                g_target, _ = _mean_grad(batch_loss, theta_t, target, chunk_size)
                timings["target_grad_s"] += time.perf_counter() - clock
                clock = time.perf_counter()
                batch = train.take(torch.as_tensor(schedule[t]))
                hv, mode = _hvp_auto(batch_loss, theta_t, batch, lam, chunk_size, mode)
                timings["hvp_s"] += time.perf_counter() - clock
                lam = {k: lam[k] + g_target[k] - lr * hv[k] for k in lam}
                bar.update(1)
        bar.close()

    scored = sorted(dots)
    raw = lqs_gamma(torch.stack([dots[t] for t in scored]), torch.stack([norms[t] for t in scored]),
                    final_norms, lr).numpy()
    metrics = {
        "lqs/train_loss_first": train_losses[0], "lqs/train_loss_last": train_losses[-1],
        "lqs/target_loss_final": target_loss_final, "lqs/lambda_norms": [lam_norms[t] for t in scored],
        "lqs/hvp_mode": mode, "lqs/trainable_params": sum(v.numel() for v in theta0.values()),
        **{f"lqs/time/{k}": v for k, v in timings.items()},
    }
    return LQSResult(scores=zscore_clip(raw), raw=raw, scored_steps=scored, metrics=metrics)


def _to(data: TokenBatch, device) -> TokenBatch:
    return TokenBatch(data.ids.to(device), data.mask.to(device), data.lengths)


def _hvp_auto(batch_loss, theta, batch, vec, chunk_size, mode):
    """Try forward-over-reverse first; fall back for good to double backward if an op lacks forward AD."""
    if mode in ("auto", "fwdrev"):
        try:
            return hessian_vector_product(batch_loss, theta, batch, vec, chunk_size, "fwdrev"), "fwdrev"
        except (NotImplementedError, RuntimeError):
            if mode == "fwdrev":
                raise
    return hessian_vector_product(batch_loss, theta, batch, vec, chunk_size, "revrev"), "revrev"


# ---------------------------------------------------------------- throughput check

def per_sample_grad_throughput(model: nn.Module, samples, chunk_size: int = 16, repeats: int = 3,
                               params: ParamSelector = None, pad_id: int = 0) -> dict[str, float]:
    """Samples/s of per-sample gradients: vmap(grad) in chunks vs a Python loop of single-sample
    backward passes. Medians over `repeats` interleaved runs; both compute ‖g_n‖, so the work is the same."""
    data = to_token_batch(samples, pad_id)
    with scoring_mode(model):
        theta, frozen = split_params(model, params)
        _, sample_loss = make_loss_fns(model, frozen)
        loop_params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}

        def run_vmap():
            per_sample_grad_stats(sample_loss, theta, data, None, chunk_size)

        def run_loop():
            for i in range(len(data)):
                b = data.take([i])
                grads = torch.autograd.grad(sample_loss(loop_params, b.ids[0], b.mask[0]), list(loop_params.values()))
                torch.sqrt(sum(g.double().pow(2).sum() for g in grads))

        run_vmap(), run_loop()  # warm-up: torch.func traces and allocator caches
        times = {"vmap": [], "loop": []}
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            for name, fn in (("vmap", run_vmap), ("loop", run_loop)):
                clock = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - clock)
    out = {f"{name}_samples_per_s": len(data) / statistics.median(t) for name, t in times.items()}
    out["speedup"] = out["vmap_samples_per_s"] / out["loop_samples_per_s"]
    return out
