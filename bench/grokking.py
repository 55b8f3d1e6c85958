"""Grokking bench for the MoE pathway monitors (algorithms.md §5).

A tiny OLMoE (transformers `OlmoeForCausalLM` from a config) learns a + b mod p from a
fraction of all pairs with full-batch AdamW and strong weight decay, which memorises first
and generalises (groks) later. At each checkpoint we record per-sample training loss,
train/test accuracy and every training sample's routing (captured with
`bridgerl.monitor.routing.RoutingCapture`). Afterwards the §5.1 criterion picks the
memorised training samples, the pathway metrics are computed on them per checkpoint, and
each metric is correlated with test accuracy (Pearson / Spearman), over the checkpoints
after test accuracy begins its sustained rise and over all checkpoints.

    python bench/grokking.py --seeds 3          # full run
    python bench/grokking.py --quick            # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from bridgerl.monitor.pathways import (
    PathwayMonitor,
    choose_epsilon,
    group_distance,
    memorisation_times,
    pathway_metrics,
    pathway_strings,
)
from bridgerl.monitor.routing import RoutingCapture, require_router_gates, token_averaged_weights

METRICS = ("distance_char", "distance_expert", "consistency", "smoothness", "layer_cosine", "train_loss", "test_loss")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=47, help="modulus; the data are all p² pairs (a, b)")
    parser.add_argument("--train-frac", type=float, default=0.5)
    parser.add_argument("--layers", type=int, default=3, help="MoE layers (consistency needs ≥ 3)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.7)
    parser.add_argument("--level", choices=("char", "expert"), default="char")
    parser.add_argument("--memorised-frac", type=float, default=0.25, help="target fraction for choosing ε (§5.1)")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--probe", type=int, default=256, help="memorised samples the metrics use (at most)")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for these tiny ops on a busy CPU")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/grokking[_quick]")
    parser.add_argument("--save-checkpoints", action="store_true", help="also write model state_dicts per checkpoint")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, few steps")
    parser.add_argument("--progress", action="store_true", help="print one line per checkpoint")
    args = parser.parse_args()
    if args.quick:
        args.p, args.steps, args.eval_every, args.seeds, args.probe = 23, 60, 15, 1, 64
    if args.out is None:  # a smoke run must not overwrite the full run's results
        args.out = Path("bench/results/grokking_quick" if args.quick else "bench/results/grokking")
    return args


def make_data(p: int, train_frac: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Inputs [a, b, =] with target (a + b) mod p; a random `train_frac` of the pairs trains."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    inputs = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    targets = (a.flatten() + b.flatten()) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_frac * p * p))
    train, test = order[:n_train], order[n_train:]
    return inputs[train], targets[train], inputs[test], targets[test]


def build_model(args: argparse.Namespace, seed: int) -> torch.nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(
        vocab_size=args.p + 1, hidden_size=args.hidden, intermediate_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=8,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
        experts_implementation="grouped_mm",  # fastest of eager/grouped_mm/batched_mm on CPU here
    )  # fmt: skip
    config._attn_implementation = "eager"  # 3-token sequences: eager beats sdpa on CPU
    return OlmoeForCausalLM(config)


@torch.no_grad()
def evaluate(model, inputs, targets, capture: RoutingCapture | None = None):
    """Per-sample answer NLL and correctness; routing weights [N, L, K] when capturing."""
    model.eval()
    logits = model(input_ids=inputs).logits[:, -1]
    model.train()
    losses = F.cross_entropy(logits, targets, reduction="none")
    correct = (logits.argmax(-1) == targets).float()
    routing = None
    if capture is not None:
        routing = torch.stack([token_averaged_weights(p, None) for p in capture.router_probs()], dim=1)
    return losses, correct, routing


def train_seed(args: argparse.Namespace, seed: int) -> dict:
    train_x, train_y, test_x, test_y = make_data(args.p, args.train_frac, seed)
    model = build_model(args, seed)
    gates = require_router_gates(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    record: dict = {"seed": seed, "steps": [], "train_acc": [], "test_acc": [], "train_loss": [], "test_loss": []}
    sample_losses, routing, rows, step_times = [], [], [], []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            with RoutingCapture(model, gates) as capture:
                losses, correct, weights = evaluate(model, train_x, train_y, capture)
            test_losses, test_correct, _ = evaluate(model, test_x, test_y)
            record["steps"].append(step)
            record["train_acc"].append(correct.mean().item())
            record["test_acc"].append(test_correct.mean().item())
            record["train_loss"].append(losses.mean().item())
            record["test_loss"].append(test_losses.mean().item())
            if args.progress:
                print(f"  seed {seed} step {step}: train acc {record['train_acc'][-1]:.3f} "
                      f"test acc {record['test_acc'][-1]:.3f} loss {record['train_loss'][-1]:.4f}", flush=True)
            sample_losses.append(losses.numpy())
            routing.append(weights.numpy())
            rows.append(torch.stack([g.rows().float() for g in gates]).numpy())
            if args.save_checkpoints:
                folder = args.out / "checkpoints" / f"seed{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), folder / f"step{step:06d}.pt")
        if step == args.steps:
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model(input_ids=train_x).logits[:, -1], train_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step_times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    # CPU seconds alongside wall seconds: the machine is shared, so wall time alone is noisy.
    record["step_seconds_median"] = statistics.median(t for t, _ in step_times)
    record["step_cpu_seconds_median"] = statistics.median(c for _, c in step_times)
    return analyse(args, record, model, train_x, np.stack(sample_losses), np.stack(routing), np.stack(rows))


def rise_onset(test_acc: np.ndarray, fraction: float = 0.1) -> int | None:
    """First checkpoint from which test accuracy stays above lo + fraction·(hi − lo)."""
    hi, lo = test_acc.max(), test_acc[: int(test_acc.argmax()) + 1].min()
    if hi - lo < 0.2:  # no generalisation jump to speak of
        return None
    above = test_acc > lo + fraction * (hi - lo)
    stays = np.flip(np.logical_and.accumulate(np.flip(above)))
    return int(stays.argmax()) if stays.any() else None


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def analyse(args, record, model, train_x, sample_losses, routing, rows) -> dict:
    epsilon = choose_epsilon(sample_losses, args.memorised_frac)
    t_star = memorisation_times(sample_losses, epsilon, args.delta)
    memorised = np.flatnonzero(t_star >= 0)
    rng = np.random.default_rng(record["seed"])
    probe = np.sort(rng.choice(memorised, size=min(args.probe, len(memorised)), replace=False))
    series: dict[str, list[float]] = {}
    for weights, layer_rows in zip(routing, rows):
        metrics = pathway_metrics(weights[probe], layer_rows, args.tau, args.level, per_layer=True)
        strings = pathway_strings(weights[probe], args.tau)
        for level in ("char", "expert"):
            metrics[f"pathways/distance_{level}"] = group_distance(strings, level)
        for key, value in metrics.items():
            series.setdefault(key.removeprefix("pathways/"), []).append(value)
    record.update(series)
    record.update(epsilon=epsilon, n_memorised=int(len(memorised)), n_probe=int(len(probe)))
    record["memorisation_step_median"] = float(np.median(np.asarray(record["steps"])[t_star[memorised]]))

    # The live monitor on the final model must agree with the offline analysis, and its cost is measured.
    monitor = PathwayMonitor(train_x[probe], tau=args.tau, level=args.level, per_layer=False)
    monitor.measure(model)  # warm-up: first call pays one-off allocation costs
    timings, cpu_timings, live = [], [], {}
    for _ in range(5):
        cpu_start = time.process_time()
        live = monitor.measure(model)
        cpu_timings.append(time.process_time() - cpu_start)
        timings.append(live["pathways/measure_seconds"])
    record["monitor_seconds_median"] = statistics.median(timings)
    record["monitor_cpu_seconds_median"] = statistics.median(cpu_timings)
    record["monitor_matches_offline"] = bool(
        abs(live["pathways/distance"] - series["distance"][-1]) < 1e-6
        and abs(live["pathways/consistency"] - series["consistency"][-1]) < 1e-6
    )

    test_acc = np.asarray(record["test_acc"])
    onset = rise_onset(test_acc)
    record["rise_onset_step"] = None if onset is None else record["steps"][onset]
    correlations = {}
    for window, start in (("after_rise", onset), ("all", 0)):
        for name in METRICS:
            if start is None:
                correlations[f"{window}/{name}"] = (float("nan"), float("nan"))
                continue
            x, y = np.asarray(record[name])[start:], test_acc[start:]
            correlations[f"{window}/{name}"] = (pearson(x, y), spearman(x, y))
    record["correlations"] = correlations
    return record


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for record in records:
        steps, seed = record["steps"], record["seed"]
        (line,) = axes[0].plot(steps, record["test_acc"], label=f"test s{seed}")
        axes[0].plot(steps, record["train_acc"], "--", color=line.get_color(), label=f"train s{seed}")
        axes[1].semilogy(steps, record["train_loss"], color=line.get_color())
        axes[2].plot(steps, record["distance"], color=line.get_color())
        axes[3].plot(steps, record["consistency"], color=line.get_color())
        axes[4].plot(steps, record["layer_cosine"], color=line.get_color())
        if record["rise_onset_step"] is not None:
            for ax in axes:
                ax.axvline(record["rise_onset_step"], color=line.get_color(), alpha=0.3, lw=0.8)
    titles = (
        "accuracy (dashed: train)", "train loss", "pathway distance D_path", "consistency C", "mean c_ℓ (layer cosine)"
    )  # fmt: skip
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def format_table(records: list[dict]) -> str:
    lines = ["| window | metric | " + " | ".join(f"seed {r['seed']} (P / S)" for r in records) + " | mean P / S |"]
    lines.append("|" + "---|" * (len(records) + 3))
    for window in ("after_rise", "all"):
        for name in METRICS:
            pairs = [r["correlations"][f"{window}/{name}"] for r in records]
            cells = [f"{p:+.3f} / {s:+.3f}" for p, s in pairs]
            mean_p = np.nanmean([p for p, _ in pairs]) if any(not math.isnan(p) for p, _ in pairs) else float("nan")
            mean_s = np.nanmean([s for _, s in pairs]) if any(not math.isnan(s) for _, s in pairs) else float("nan")
            lines.append(f"| {window} | {name} | " + " | ".join(cells) + f" | {mean_p:+.3f} / {mean_s:+.3f} |")
    return "\n".join(lines)


def describe(r: dict) -> str:
    ms = lambda key: f"{r[key] * 1e3:.1f} ms"  # noqa: E731
    return (
        f"seed {r['seed']}: final train/test acc {r['train_acc'][-1]:.3f}/{r['test_acc'][-1]:.3f}, "
        f"rise onset step {r['rise_onset_step']}, memorised {r['n_memorised']} (ε={r['epsilon']:.4f}, "
        f"median t* step {r['memorisation_step_median']:.0f}), "
        f"train step {ms('step_seconds_median')} ({ms('step_cpu_seconds_median')} CPU), "
        f"monitor {ms('monitor_seconds_median')} ({ms('monitor_cpu_seconds_median')} CPU) on {r['n_probe']} samples "
        f"(matches offline: {r['monitor_matches_offline']}), {r['seconds']:.0f} s"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = []
    partial = args.out / "grokking.partial.json"
    for seed in range(args.seeds):
        seed_start = time.perf_counter()
        record = train_seed(args, seed)
        record["seconds"] = time.perf_counter() - seed_start
        records.append(record)
        print(describe(record), flush=True)
        partial.write_text(json.dumps(records, indent=1))  # survives an interrupted multi-seed run
    figure = args.out / "grokking.png"
    plot(records, figure)
    table = format_table(records)
    seconds = time.perf_counter() - started
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "records": records, "seconds": seconds}
    (args.out / "grokking.json").write_text(json.dumps(summary, indent=1))
    (args.out / "correlations.md").write_text(table + "\n")
    partial.unlink(missing_ok=True)
    print("\nCorrelation with test accuracy, Pearson / Spearman over checkpoints\n")
    print(table)
    print(f"\nfigure: {figure}\ntotal {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
