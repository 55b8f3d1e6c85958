"""Grokking bench for the MoE pathway monitors (algorithms.md §5).

A tiny OLMoE (transformers `OlmoeForCausalLM` from a config) learns a + b mod p from a
fraction of all pairs with full-batch AdamW and strong weight decay, which memorises first
and generalises (groks) later. The routers (gate weights) are exempt from weight decay and
trained with the Switch/OLMoE load-balancing loss and a router z-loss instead, both computed
from logits captured by forward hooks on the gates (`RoutingCapture(keep_graph=True)`), so
the routers can become sharp: with weight decay on them they stay near uniform, and the
pathway distance then only tracks how flat the softmax is.

A checkpoint every `--eval-every` steps records per-sample training loss, train/test
accuracy, the routers' mean top-1 probability, both auxiliary losses and every training
sample's routing. Afterwards the §5.1 criterion picks the memorised training samples, the
pathway metrics are computed on them per checkpoint, and so is a shuffled-experts baseline:
each sample's expert ids are permuted at random per layer (the multiset of its weights, so
its pathway lengths, stay the same; only the identity shared across samples is broken).
Each metric, and the distance relative to that baseline, is correlated with test accuracy
(Pearson / Spearman) over the rise only: from the onset of test accuracy's sustained rise to
the first checkpoint where it reaches `--plateau` × its maximum; and over the grokking phase,
which starts only where test accuracy leaves the mirror share (test pairs whose mirror
b + a is a training pair, ≈ 50%, which memorisation answers). Changes-vs-changes and
vs-step correlations show how much of a level correlation is a shared trend over time.

    python bench/grokking.py --seeds 5 --progress   # full run (~30 min of one core)
    python bench/grokking.py --quick                # smoke run, under a minute
    python bench/grokking.py --report bench/results/grokking/grokking.json   # tables again
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
from bridgerl.monitor.routing import RoutingCapture, require_router_gates, router_aux_losses, token_averaged_weights

# Series correlated with test accuracy over the rise. rel_* = distance / shuffled baseline;
# "steps" (time alone) is the yardstick a metric must beat to say more than "training went on".
METRICS = (
    "distance_char", "rel_distance_char", "baseline_char", "distance_expert", "rel_distance_expert",
    "consistency", "layer_cosine", "kept_experts", "router_top1", "train_loss", "test_loss", "steps",
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=47, help="modulus; the data are all p² pairs (a, b)")
    parser.add_argument("--train-frac", type=float, default=0.5)
    parser.add_argument("--layers", type=int, default=3, help="MoE layers (consistency needs ≥ 3)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=10, help="checkpoint spacing; dense so the rise has many points")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1.0, help="AdamW weight decay of all but the routers")
    parser.add_argument("--router-weight-decay", type=float, default=0.0, help="weight decay of the gate weights")
    parser.add_argument("--balance-coef", type=float, default=0.01, help="load-balancing loss coefficient (OLMoE: 0.01)")
    parser.add_argument("--z-coef", type=float, default=0.001, help="router z-loss coefficient (OLMoE: 0.001)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tau", type=float, default=0.7)
    parser.add_argument("--level", choices=("char", "expert"), default="char")
    parser.add_argument("--memorised-frac", type=float, default=0.25, help="target fraction for choosing ε (§5.1)")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--probe", type=int, default=256, help="memorised samples the metrics use (at most)")
    parser.add_argument("--shuffles", type=int, default=2, help="shuffled-expert draws averaged for the baseline")
    parser.add_argument("--plateau", type=float, default=0.95, help="the rise ends at this fraction of max test acc")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for these tiny ops on a busy CPU")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/grokking[_quick]")
    parser.add_argument("--save-checkpoints", action="store_true", help="also write model state_dicts per checkpoint")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, few steps")
    parser.add_argument("--progress", action="store_true", help="print one line per 10 checkpoints")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="no training: rebuild the figure and tables in --out from a saved grokking.json or "
                             "grokking.partial.json (e.g. the seeds an interrupted run finished)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.p, args.steps, args.eval_every, args.seeds, args.probe = 23, 60, 5, 1, 64
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
def evaluate(model, inputs, targets, capture: RoutingCapture | None = None, top_k: int = 2):
    """Per-sample answer NLL and correctness; with a capture also the routing weights
    [N, L, K], the routers' mean top-1 probability per layer [L] and the auxiliary losses."""
    model.eval()
    logits = model(input_ids=inputs).logits[:, -1]
    model.train()
    losses = F.cross_entropy(logits, targets, reduction="none")
    correct = (logits.argmax(-1) == targets).float()
    if capture is None:
        return losses, correct, None
    probs = capture.router_probs()
    routing = torch.stack([token_averaged_weights(p, None) for p in probs], dim=1)
    top1 = torch.stack([p.max(dim=-1).values.mean() for p in probs])
    aux = {k: v.item() for k, v in router_aux_losses(capture.router_logits(), top_k).items()}
    return losses, correct, {"routing": routing, "top1": top1, **aux}


def make_optimizer(model, gates, args) -> torch.optim.Optimizer:
    """AdamW with the gate weights in their own group (weight decay `--router-weight-decay`)."""
    router_ids = {id(g.module.weight) for g in gates}
    routers = [p for p in model.parameters() if id(p) in router_ids]
    rest = [p for p in model.parameters() if id(p) not in router_ids]
    groups = [
        {"params": rest, "weight_decay": args.weight_decay},
        {"params": routers, "weight_decay": args.router_weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))


def train_seed(args: argparse.Namespace, seed: int) -> dict:
    train_x, train_y, test_x, test_y = make_data(args.p, args.train_frac, seed)
    model = build_model(args, seed)
    gates = require_router_gates(model)
    optimizer = make_optimizer(model, gates, args)
    warmup = max(1, args.steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    keys = ("steps", "train_acc", "test_acc", "train_loss", "test_loss", "router_top1", "load_balance", "z_loss")
    record: dict = {"seed": seed, "router_top1_per_layer": [], **{k: [] for k in keys}}
    sample_losses, routing, rows, step_times = [], [], [], []
    # One capture for the whole run: it keeps the graph, so the training forward's logits
    # feed the auxiliary losses; under no_grad (evaluation) the same hooks hold plain tensors.
    with RoutingCapture(model, gates, keep_graph=True) as capture:
        for step in range(args.steps + 1):
            if step % args.eval_every == 0 or step == args.steps:
                losses, correct, routed = evaluate(model, train_x, train_y, capture, args.top_k)
                test_losses, test_correct, _ = evaluate(model, test_x, test_y)
                values = (step, correct.mean().item(), test_correct.mean().item(), losses.mean().item(),
                          test_losses.mean().item(), routed["top1"].mean().item(),
                          routed["load_balance"], routed["z_loss"])  # fmt: skip
                for key, value in zip(keys, values):
                    record[key].append(value)
                record["router_top1_per_layer"].append(routed["top1"].tolist())
                if args.progress and len(record["steps"]) % 10 == 1:
                    print(f"  seed {seed} step {step}: train/test acc {values[1]:.3f}/{values[2]:.3f} "
                          f"loss {values[3]:.4f} top-1 {values[5]:.3f} balance {values[6]:.3f} "
                          f"z {values[7]:.3f}", flush=True)  # fmt: skip
                sample_losses.append(losses.numpy())
                routing.append(routed["routing"].numpy())
                rows.append(torch.stack([g.rows().float() for g in gates]).numpy())
                if args.save_checkpoints:
                    folder = args.out / "checkpoints" / f"seed{seed}"
                    folder.mkdir(parents=True, exist_ok=True)
                    torch.save(model.state_dict(), folder / f"step{step:06d}.pt")
            if step == args.steps:
                break
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = F.cross_entropy(model(input_ids=train_x).logits[:, -1], train_y)
            aux = router_aux_losses(capture.router_logits(), args.top_k)
            loss = loss + args.balance_coef * aux["load_balance"] + args.z_coef * aux["z_loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    # CPU seconds alongside wall seconds: the machine is shared, so wall time alone is noisy.
    record["step_seconds_median"] = statistics.median(t for t, _ in step_times)
    record["step_cpu_seconds_median"] = statistics.median(c for _, c in step_times)
    return analyse(args, record, model, train_x, np.stack(sample_losses), np.stack(routing), np.stack(rows))


def rise_onset(test_acc: np.ndarray, fraction: float = 0.1, floor: float | None = None,
               min_jump: float = 0.2) -> int | None:  # fmt: skip
    """First checkpoint from which test accuracy stays above lo + fraction·(hi − lo).

    lo is the pre-peak low, or `floor` when given (e.g. the mirror share: accuracy that
    a + b = b + a gives away without generalising). None when hi − lo < `min_jump`.
    """
    hi = test_acc.max()
    lo = test_acc[: int(test_acc.argmax()) + 1].min() if floor is None else floor
    if hi - lo < min_jump:  # no generalisation jump to speak of
        return None
    above = test_acc > lo + fraction * (hi - lo)
    stays = np.flip(np.logical_and.accumulate(np.flip(above)))
    return int(stays.argmax()) if stays.any() else None


def running_median(x: np.ndarray, width: int) -> np.ndarray:
    """Centred running median (edges padded with the end values), same length as x."""
    half = width // 2
    padded = np.concatenate([np.full(half, x[0]), x, np.full(half, x[-1])])
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, width), axis=-1)


def mirror_share(p: int, train_frac: float, seed: int) -> float:
    """Share of test pairs (a, b) whose mirror (b, a) is a training pair (never when a = b).

    Addition commutes, so a model that only memorised its training pairs can answer these;
    test accuracy's early jump to about this level is memorisation, not grokking.
    """
    train_x, _, test_x, _ = make_data(p, train_frac, seed)
    train = {(int(a), int(b)) for a, b, _ in train_x}
    return float(np.mean([(int(b), int(a)) in train for a, b, _ in test_x]))


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


def rise_end(test_acc: np.ndarray, onset: int, plateau: float) -> int:
    """First checkpoint from the onset on where test accuracy reaches `plateau` × its maximum."""
    reached = np.flatnonzero(test_acc[onset:] >= plateau * test_acc.max())
    return onset + int(reached[0]) if len(reached) else len(test_acc) - 1


def shuffle_experts(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute each sample's expert ids independently per layer: weights [N, L, K].

    Every (sample, layer) keeps its multiset of weights, hence its kept-expert count and
    pathway length; which experts those are no longer agrees across samples except by chance.
    """
    order = np.argsort(rng.random(weights.shape), axis=-1)
    return np.take_along_axis(weights, order, axis=-1)


def shuffled_distance(weights: np.ndarray, tau: float, level: str, draws: int, rng: np.random.Generator) -> float:
    return float(np.mean([group_distance(pathway_strings(shuffle_experts(weights, rng), tau), level) for _ in range(draws)]))


def correlate(record: dict, names, start: int | None, stop: int | None, against: str = "test_acc",
              diff: bool = False) -> dict:  # fmt: skip
    """Pearson / Spearman of each series with `against` over checkpoints [start, stop].

    `diff=True` correlates checkpoint-to-checkpoint changes instead of levels, which removes
    any shared trend over time: what is left is whether the two move together step by step.
    """
    out = {}
    for name in names:
        if start is None:
            out[name] = (float("nan"), float("nan"))
            continue
        x, y = np.asarray(record[name])[start : stop + 1], np.asarray(record[against])[start : stop + 1]
        if diff:
            x, y = np.diff(x), np.diff(y)
        out[name] = (pearson(x, y), spearman(x, y))
    return out


def analyse(args, record, model, train_x, sample_losses, routing, rows) -> dict:
    epsilon = choose_epsilon(sample_losses, args.memorised_frac)
    t_star = memorisation_times(sample_losses, epsilon, args.delta)
    memorised = np.flatnonzero(t_star >= 0)
    rng = np.random.default_rng(record["seed"])
    probe = np.sort(rng.choice(memorised, size=min(args.probe, len(memorised)), replace=False))
    series: dict[str, list[float]] = {}
    for weights, layer_rows in zip(routing, rows):
        weights = weights[probe]
        metrics = pathway_metrics(weights, layer_rows, args.tau, args.level, per_layer=True)
        strings = pathway_strings(weights, args.tau)
        for level in ("char", "expert"):
            metrics[f"distance_{level}"] = group_distance(strings, level)
            metrics[f"baseline_{level}"] = shuffled_distance(weights, args.tau, level, args.shuffles, rng)
            metrics[f"rel_distance_{level}"] = metrics[f"distance_{level}"] / metrics[f"baseline_{level}"]
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

    return add_correlations(record, args.plateau, mirror_share(args.p, args.train_frac, record["seed"]))


def add_correlations(record: dict, plateau: float, mirror: float | None = None) -> dict:
    """The rise window and every correlation, from the recorded per-checkpoint series.

    With `mirror` (see `mirror_share`) a second window, "grok", starts where test accuracy
    stays above mirror + 10% of the way to its maximum: generalisation beyond a + b = b + a.
    Both end where the raw test accuracy first reaches `plateau` × its maximum.
    """
    test_acc = np.asarray(record["test_acc"])
    # Slingshot spikes drop test accuracy for a checkpoint or two, at times nearly to 0; onsets
    # are found on a running median over 9 checkpoints so that one late dip cannot postpone
    # "stays above" to the very end. The correlations use the raw series.
    smooth = running_median(test_acc, 9)
    windows = {"rise": rise_onset(smooth)}
    if mirror is not None:
        record["mirror_share"] = mirror
        windows["grok"] = rise_onset(smooth, floor=mirror, min_jump=0.1)
    correlations = {"all": correlate(record, METRICS, 0, len(test_acc) - 1)}
    for window, onset in windows.items():
        end = None if onset is None else rise_end(test_acc, onset, plateau)
        prefix = "rise" if window == "rise" else f"{window}_rise"
        record[f"{prefix}_onset_step"] = None if onset is None else record["steps"][onset]
        record[f"{prefix}_end_step"] = None if end is None else record["steps"][end]
        record[f"{prefix}_checkpoints"] = 0 if onset is None else end - onset + 1
        correlations[window] = correlate(record, METRICS, onset, end)
        correlations[f"{window}_changes"] = correlate(record, METRICS, onset, end, diff=True)
        # A level that just drifts with time correlates with any monotone accuracy curve.
        correlations[f"{window}_vs_step"] = correlate(record, METRICS, onset, end, "steps")
        # Does the raw distance follow router sharpness? (the suspicion)
        correlations[f"{window}_vs_router_top1"] = correlate(
            record, ("distance_char", "rel_distance_char"), onset, end, "router_top1"
        )
    record["correlations"] = correlations
    return record


def plot(records: list[dict], path: Path, top_k: int, experts: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    axes = axes.flatten()
    for record in records:
        steps, seed = record["steps"], record["seed"]
        (line,) = axes[0].plot(steps, record["test_acc"], label=f"test s{seed}")
        color = line.get_color()
        axes[0].plot(steps, record["train_acc"], "--", color=color, lw=0.8)
        axes[1].plot(steps, record["router_top1"], color=color)
        axes[2].plot(steps, record["distance_char"], color=color)
        axes[2].plot(steps, record["baseline_char"], ":", color=color, lw=0.8)
        axes[3].plot(steps, record["rel_distance_char"], color=color)
        axes[4].plot(steps, record["consistency"], color=color)
        axes[5].plot(steps, record["layer_cosine"], color=color)
        for ax in axes:
            for key, style in (("rise_onset_step", "-"), ("rise_end_step", "-"), ("grok_rise_onset_step", "--")):
                if record.get(key) is not None:
                    ax.axvline(record[key], color=color, alpha=0.4, lw=0.8, ls=style)
    axes[1].axhline(1 / experts, color="k", lw=0.6, ls=":")
    titles = (
        "accuracy (dashed: train)", f"router mean top-1 prob (dotted: 1/{experts})",
        "D_path char (dotted: shuffled baseline)", "D_path / shuffled baseline", "consistency C",
        "mean c_ℓ (layer cosine)",
    )  # fmt: skip
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle("thin vertical lines: each seed's rise onset and its 95% end; dashed: grok-phase onset")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def mean_se(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard error and count over the finite values."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    se = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else float("nan")
    return statistics.fmean(finite), se, len(finite)


def format_table(records: list[dict], window: str = "rise", names=METRICS) -> str:
    seeds = " | ".join(f"s{r['seed']} P / S" for r in records)
    lines = [f"| metric | {seeds} | mean ± SE Pearson | mean ± SE Spearman |", "|" + "---|" * (len(records) + 3)]
    for name in names:
        pairs = [r["correlations"][window][name] for r in records]
        cells = " | ".join(f"{p:+.2f} / {s:+.2f}" for p, s in pairs)
        stats = []
        for index in (0, 1):
            mean, se, n = mean_se([pair[index] for pair in pairs])
            stats.append(f"{mean:+.3f} ± {se:.3f}" + ("" if n == len(pairs) else f" (n={n})"))
        lines.append(f"| {name} | {cells} | {stats[0]} | {stats[1]} |")
    return "\n".join(lines)


def rise_summary(records: list[dict], top_k: int, experts: int) -> str:
    """Router sharpness and the rise window per seed, plus mean ± SE of the main levels."""
    lines = ["| seed | rise (steps) | checkpoints | mirror share | grok phase (checkpoints) | router top-1 at onset → "
             "end | final top-1 | kept experts (end) | D_path char (end) | baseline (end) | D / baseline (end) "
             "| final train/test acc |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        if r["rise_onset_step"] is None:
            lines.append(f"| {r['seed']} | no rise | 0 | | | | {r['router_top1'][-1]:.3f} | | | | | "
                         f"{r['train_acc'][-1]:.3f}/{r['test_acc'][-1]:.3f} |")  # fmt: skip
            continue
        i, j = r["steps"].index(r["rise_onset_step"]), r["steps"].index(r["rise_end_step"])
        grok = "none" if r.get("grok_rise_onset_step") is None else (
            f"{r['grok_rise_onset_step']}–{r['grok_rise_end_step']} ({r['grok_rise_checkpoints']})")
        lines.append(
            f"| {r['seed']} | {r['rise_onset_step']}–{r['rise_end_step']} | {r['rise_checkpoints']} | "
            f"{r.get('mirror_share', float('nan')):.3f} | {grok} | "
            f"{r['router_top1'][i]:.3f} → {r['router_top1'][j]:.3f} | {r['router_top1'][-1]:.3f} | "
            f"{r['kept_experts'][j]:.2f} | {r['distance_char'][j]:.2f} | {r['baseline_char'][j]:.2f} | "
            f"{r['rel_distance_char'][j]:.3f} | {r['train_acc'][-1]:.3f}/{r['test_acc'][-1]:.3f} |"
        )
    final = mean_se([r["router_top1"][-1] for r in records])
    lines.append(f"\nFinal router top-1 probability {final[0]:.3f} ± {final[1]:.3f} (mean ± SE over {final[2]} "
                 f"seeds; uniform 1/{experts} = {1 / experts:.3f}, top-{top_k}).")  # fmt: skip
    return "\n".join(lines)


def describe(r: dict) -> str:
    ms = lambda key: f"{r[key] * 1e3:.1f} ms"  # noqa: E731
    rise = r["correlations"]["rise"]
    return (
        f"seed {r['seed']}: final train/test acc {r['train_acc'][-1]:.3f}/{r['test_acc'][-1]:.3f}, "
        f"rise {r['rise_onset_step']}–{r['rise_end_step']} ({r['rise_checkpoints']} checkpoints), "
        f"router top-1 {r['router_top1'][0]:.3f} → {r['router_top1'][-1]:.3f}, "
        f"memorised {r['n_memorised']} (ε={r['epsilon']:.4f}, median t* step {r['memorisation_step_median']:.0f}), "
        f"rise corr P/S: D {rise['distance_char'][0]:+.2f}/{rise['distance_char'][1]:+.2f}, "
        f"D/base {rise['rel_distance_char'][0]:+.2f}/{rise['rel_distance_char'][1]:+.2f}, "
        f"C {rise['consistency'][0]:+.2f}/{rise['consistency'][1]:+.2f}; "
        f"train step {ms('step_seconds_median')} ({ms('step_cpu_seconds_median')} CPU), "
        f"monitor {ms('monitor_seconds_median')} ({ms('monitor_cpu_seconds_median')} CPU) on {r['n_probe']} samples "
        f"(matches offline: {r['monitor_matches_offline']}), {r['seconds']:.0f} s"
    )


def write_report(args: argparse.Namespace, records: list[dict], seconds: float) -> str:
    figure = args.out / "grokking.png"
    plot(records, figure, args.top_k, args.experts)
    sections = [rise_summary(records, args.top_k, args.experts)]
    windows = (
        ("rise", "the rise (onset of the sustained rise → 95% of max)"),
        ("grok", "the grokking phase (test accuracy beyond the mirror share → 95% of max)"),
    )
    for window, label in windows:
        sections += [
            f"Correlation with test accuracy over {label} (Pearson / Spearman per seed):\n\n"
            + format_table(records, window),
            f"Correlation of checkpoint-to-checkpoint changes with test accuracy's changes over {label} "
            "(shared time trends removed):\n\n" + format_table(records, f"{window}_changes", METRICS[:-1]),
            f"Correlation with the step number over {label} (how much of a level is a time trend):\n\n"
            + format_table(records, f"{window}_vs_step", METRICS[:-1]),
            f"Correlation with router top-1 probability over {label}:\n\n"
            + format_table(records, f"{window}_vs_router_top1", ("distance_char", "rel_distance_char")),
        ]
    sections.append("Correlation with test accuracy over all checkpoints:\n\n" + format_table(records, "all"))
    report = "\n\n".join(sections)
    (args.out / "correlations.md").write_text(report + "\n")
    return report + f"\n\nfigure: {figure}\ntotal {seconds:.0f} s"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        if not args.report.is_file():
            raise SystemExit(f"--report {args.report}: no such file; pass a grokking.json or grokking.partial.json "
                             "that a run of this bench wrote.")  # fmt: skip
        saved = json.loads(args.report.read_text())
        records = saved["records"] if isinstance(saved, dict) else saved
        records = [add_correlations(r, args.plateau, mirror_share(args.p, args.train_frac, r["seed"])) for r in records]
        seconds = saved["seconds"] if isinstance(saved, dict) else sum(r["seconds"] for r in records)
        print(write_report(args, records, seconds))
        return
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
    seconds = time.perf_counter() - started
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "records": records, "seconds": seconds}
    (args.out / "grokking.json").write_text(json.dumps(summary))
    partial.unlink(missing_ok=True)
    print("\n" + write_report(args, records, seconds))


if __name__ == "__main__":
    main()
