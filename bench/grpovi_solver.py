"""GRPOVI solver scaling: closed-form one-pass vs the literal walk vs O(n²) enumeration.

    python bench/grpovi_solver.py            # n = 8 … 10⁴, batched 4096 × 16 (CPU, and CUDA if present)
    python bench/grpovi_solver.py --quick    # smaller sizes, fewer repeats

Prints medians. Enumeration runs only while its projected time stays under --enum-budget s.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

import sys

from bridgerl.algos.grpovi import increase_variance, increase_variance_groups

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from grpovi_reference import enumerate_optimum, one_pass_walk  # noqa: E402  (reference solvers live with the tests)


def median_seconds(fn, min_repeats: int, budget_s: float, sync=lambda: None) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of fn() over at least min_repeats runs (more while under budget_s).

    CPU time is reported beside wall time because on a shared machine the wall time mostly
    measures how long the process waited for a core.
    """
    fn()
    sync()  # warm-up: first-call allocations and lazy init are not what we measure
    walls: list[float] = []
    cpus: list[float] = []
    start = time.perf_counter()
    while len(walls) < min_repeats or (time.perf_counter() - start < budget_s and len(walls) < 200):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def loglog_slope(ns: list[int], secs: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(secs), 1)[0]) if len(ns) >= 2 else float("nan")


# ---------------------------------------------------- batched alternatives we did not ship
def enumerate_groups(r: torch.Tensor, p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """All O(n²) Lemma-2 vertices of every group at once (no tie blocks: bench data has no ties)."""
    r_sorted, order = torch.sort(r, dim=1, descending=True)
    p_sorted = torch.gather(p / p.sum(1, keepdim=True), 1, order)
    C = torch.cat([torch.zeros_like(p_sorted[:, :1]), p_sorted.cumsum(1)], 1)  # [G, n+1]
    k, l = torch.triu_indices(r.shape[1] + 1, r.shape[1] + 1, offset=1, device=r.device)
    s_a, s_b, s_c = C[:, k], C[:, l] - C[:, k], C[:, -1:] - C[:, l]
    c = (p_sorted * r_sorted).sum(1, keepdim=True)
    alpha = (c - hi * s_a - lo * s_c) / s_b
    f = s_a * hi**2 + s_b * alpha**2 + s_c * lo**2
    f = torch.where((alpha >= lo - 1e-12) & (alpha <= hi + 1e-12), f, -torch.inf)
    best = f.argmax(1)
    kb, lb, ab = k[best][:, None], l[best][:, None], alpha.gather(1, best[:, None]).clamp(lo, hi)
    idx = torch.arange(r.shape[1], device=r.device)[None]
    z_sorted = torch.where(idx < kb, hi, torch.where(idx < lb, ab, lo))
    return torch.empty_like(z_sorted).scatter_(1, order, z_sorted)


def pairwise_groups(r: torch.Tensor, p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The shipped closed form without a sort: weight above each item from all n² comparisons."""
    p = p / p.sum(1, keepdim=True)
    above = ((r.unsqueeze(1) > r.unsqueeze(2)) * p.unsqueeze(1)).sum(2)
    at_or_above = ((r.unsqueeze(1) >= r.unsqueeze(2)) * p.unsqueeze(1)).sum(2)
    t = ((p * r).sum(1, keepdim=True) - lo) / (hi - lo)
    alpha = (lo + (hi - lo) * (t - above) / (at_or_above - above).clamp_min(1e-300)).clamp(lo, hi)
    return torch.where(at_or_above < t, hi, torch.where(above >= t, lo, alpha))


def walk_groups(r: torch.Tensor, p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The §3.2 walk vectorised across groups: ≤ n sequential steps (no tie blocks)."""
    G, n = r.shape
    r_sorted, order = torch.sort(r, dim=1, descending=True)
    p_sorted = torch.gather(p / p.sum(1, keepdim=True), 1, order)
    C = torch.cat([torch.zeros_like(p_sorted[:, :1]), p_sorted.cumsum(1)], 1)
    c = (p_sorted * r_sorted).sum(1)
    rows = torch.arange(G, device=r.device)

    def vertex(k, l):
        s_a, s_b, s_c = C[rows, k], C[rows, l] - C[rows, k], C[:, -1] - C[rows, l]
        alpha = (c - hi * s_a - lo * s_c) / s_b.clamp_min(1e-300)
        ok = (s_b > 0) & (alpha >= lo - 1e-12) & (alpha <= hi + 1e-12)
        return alpha.clamp(lo, hi), torch.where(ok, s_a * hi**2 + s_b * alpha**2 + s_c * lo**2, -torch.inf)

    k = torch.zeros(G, dtype=torch.long, device=r.device)
    l = torch.full((G,), n, dtype=torch.long, device=r.device)
    alpha, f = vertex(k, l)
    for _ in range(n):
        a1, f1 = vertex((k + 1).clamp(max=n), l)
        a2, f2 = vertex(k, (l - 1).clamp(min=0))
        take1 = (k < l) & (f1 > f) & ~((l > k) & (f2 > f1))
        take2 = (l > k) & (f2 > f) & ~take1
        if not (take1 | take2).any():
            break
        k, l = torch.where(take1, k + 1, k), torch.where(take2, l - 1, l)
        alpha = torch.where(take1, a1, torch.where(take2, a2, alpha))
        f = torch.where(take1, f1, torch.where(take2, f2, f))
    idx = torch.arange(n, device=r.device)[None]
    z_sorted = torch.where(idx < k[:, None], hi, torch.where(idx < l[:, None], alpha[:, None], lo))
    return torch.empty_like(z_sorted).scatter_(1, order, z_sorted)


# ------------------------------------------------------------------------------- main
def single_group_table(sizes: list[int], min_repeats: int, budget_s: float, enum_budget_s: float) -> None:
    rng = np.random.default_rng(0)
    rows: dict[str, tuple[list[int], list[float]]] = {"one-pass (shipped)": ([], []), "walk (§3.2 loop)": ([], []), "enumeration O(n²)": ([], [])}
    fns = {"one-pass (shipped)": increase_variance, "walk (§3.2 loop)": one_pass_walk, "enumeration O(n²)": enumerate_optimum}
    print(f"{'n':>7} | " + " | ".join(f"{name:>20}" for name in fns))
    for n in sizes:
        r, p = rng.random(n), rng.random(n)
        cells = []
        for name, fn in fns.items():
            ns, secs = rows[name]
            projected = secs[-1] * (n / ns[-1]) ** 2 if secs else 0.0
            if name.startswith("enumeration") and projected > enum_budget_s:
                cells.append(f"{'skipped':>20}")
                continue
            sec, _ = median_seconds(lambda: fn(r, p, 0.0, 1.0), min_repeats if n < 5000 or not name.startswith("enum") else 1, budget_s)
            ns.append(n)
            secs.append(sec)
            cells.append(f"{sec * 1e3:>17.3f} ms")
        print(f"{n:>7} | " + " | ".join(cells))
        check = increase_variance(r, p, 0.0, 1.0)
        if rows["enumeration O(n²)"][0][-1:] == [n]:
            z = enumerate_optimum(r, p, 0.0, 1.0)
            assert abs(p @ (check**2) - p @ (z**2)) <= 1e-9 * p.sum(), f"one-pass and enumeration disagree at n={n}"
    print("log-log slope over n ≥ 1024: raw | after subtracting the fastest time (fixed per-call overhead)")
    for name, (ns, secs) in rows.items():
        big = [(n_, s_) for n_, s_ in zip(ns, secs) if n_ >= 1024]
        raw = loglog_slope([b[0] for b in big], [b[1] for b in big])
        net = [(n_, s_ - min(secs)) for n_, s_ in big if s_ > min(secs)]
        print(f"  {name:<20} {raw:5.2f} | {loglog_slope([b[0] for b in net], [b[1] for b in net]):5.2f}")


def batched_table(G: int, n: int, min_repeats: int, budget_s: float) -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"\nbatched {G} groups × {n} (float64 inside), median ms: wall (process CPU; on CUDA wall only)")
    names = ("one-pass (shipped)", "pairwise, no sort", "enumerate O(n²)", "walk ≤n steps")
    print(f"{'device':>7} | " + " | ".join(f"{name:>20}" for name in names))
    for device in devices:
        gen = torch.Generator().manual_seed(0)
        r = torch.rand(G, n, generator=gen, dtype=torch.float64).to(device)
        p = torch.rand(G, n, generator=gen, dtype=torch.float64).to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        shipped = increase_variance_groups(r, p, 0.0, 1.0)
        for alt in (pairwise_groups, enumerate_groups, walk_groups):  # same optimum, or the comparison means nothing
            z = alt(r, p, 0.0, 1.0)
            assert torch.allclose((p * z * z).sum(1), (p * shipped * shipped).sum(1), atol=1e-9), alt.__name__
        cells = []
        for fn in (increase_variance_groups, pairwise_groups, enumerate_groups, walk_groups):
            wall, cpu = median_seconds(lambda fn=fn: fn(r, p, 0.0, 1.0), min_repeats, budget_s, sync)
            cells.append(f"{wall * 1e3:7.3f} ({cpu * 1e3:6.3f})" if device == "cpu" else f"{wall * 1e3:16.3f}")
        print(f"{device:>7} | " + " | ".join(f"{c:>20}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--enum-budget", type=float, default=60.0, help="skip enumeration once its projected time exceeds this (s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [8, 16, 64, 256, 1024, 4096] if args.quick else [8, 16, 64, 256, 1024, 2048, 4096, 10_000]
    min_repeats, budget_s = (3, 0.2) if args.quick else (5, 1.0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {load:.1f}")
    single_group_table(sizes, min_repeats, budget_s, args.enum_budget)
    batched_table(4096, 16, min_repeats, budget_s)


if __name__ == "__main__":
    main()
