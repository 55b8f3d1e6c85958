"""The demo's machine-readable result, `summary.json`, and what is drawn from it: the headline
sentence, the across-seed table and the plot of held-out score against sync_every.

    {"task": "...", "metric": "...", "seed_model": {"mean": 0.22, "se": 0.01},
     "regimes": [{"name": "online DPO (s=1)", "algo": "dpo", "sync_every": 1, "steps": 150,
                  "seeds": [0, 1, 2], "final": [0.31, 0.33, 0.30], "mean": 0.31, "se": 0.01,
                  "generated_tokens": 0, "trained_tokens": 0, "wall_s": 0.0}]}

`sync_every` is 0 for offline. `final` holds one held-out score per training seed; `mean` and `se`
are across those seeds. The seed model's `se` is over held-out prompts. Token counts and wall time
are per run, averaged over the seeds. `bridgerl report DEMO_FOLDER` reads this file.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from .table import Table

__all__ = ["SUMMARY", "read_summary", "write_summary", "headline", "summary_table", "plot_sync_every",
           "across_seeds", "is_summary_folder", "below_seed_notes"]

SUMMARY = "summary.json"
_REQUIRED = ("name", "algo", "sync_every", "seeds", "final", "mean", "se")


def across_seeds(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean across seeds (0 for a single seed)."""
    if not values:
        raise ValueError("no values to average")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def is_summary_folder(path: str | Path) -> bool:
    return (Path(path) / SUMMARY).exists() and not (Path(path) / "metrics.jsonl").exists()


def write_summary(path: str | Path, summary: dict) -> Path:
    path = Path(path)
    _check(summary, path)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def read_summary(path: str | Path) -> dict:
    """Load summary.json (a file, or the folder holding it) and check its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {SUMMARY}; `bridgerl demo` writes one beside report.md")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    _check(summary, path)
    return summary


def _check(summary: dict, path: Path) -> None:
    if not isinstance(summary.get("regimes"), list) or "seed_model" not in summary:
        raise ValueError(f"{path}: a demo summary needs 'seed_model' and a list of 'regimes'")
    for r in summary["regimes"]:
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise ValueError(f"{path}: regime {r.get('name', '?')!r} lacks {', '.join(missing)}")
        if len(r["final"]) != len(r["seeds"]):
            raise ValueError(f"{path}: regime {r['name']!r} has {len(r['final'])} scores for {len(r['seeds'])} seeds")


def _signed(x: float) -> str:
    return f"{'+' if x >= 0 else '−'}{abs(x):.3f}"


def _short(r: dict) -> str:
    if r["algo"] == "dpo" and not r.get("optune"):
        s = r["sync_every"]
        return "offline DPO" if s == 0 else "online DPO" if s == 1 else f"s={s}"
    return r["name"]


def _paired(a: dict, b: dict) -> list[float]:
    """a − b for every training seed both regimes ran (the same seed draws the same prompts, so the
    paired difference leaves out the seed-to-seed spread they share); [] with fewer than two."""
    of_b = dict(zip(b["seeds"], b["final"]))
    diffs = [v - of_b[k] for k, v in zip(a["seeds"], a["final"]) if k in of_b]
    return diffs if len(diffs) >= 2 else []


def headline(summary: dict) -> str:
    """One sentence: each regime's gain over the seed (mean ± SE across seeds), then whether the
    paper's order online ≥ semi-online ≥ offline held (every semi-online regime between online and
    offline), and which regimes did not beat the seed."""
    seed = summary["seed_model"]["mean"]
    regimes = summary["regimes"]
    order = sorted(regimes, key=lambda r: -r["mean"])
    gains = "; ".join(f"{_short(r)} {_signed(r['mean'] - seed)} ± {r['se']:.3f}" for r in order)
    n_seeds = sorted({len(r["seeds"]) for r in regimes})
    text = (f"Over the seed model ({seed:.3f} ± {summary['seed_model']['se']:.3f} {summary.get('metric', 'held-out score')}), "
            f"mean ± SE over {'/'.join(map(str, n_seeds))} training seeds: {gains}.")
    dpo = sorted((r for r in regimes if r["algo"] == "dpo" and not r.get("optune")),
                 key=lambda r: r["sync_every"] or math.inf)
    if len(dpo) >= 2:
        first, last, middle = dpo[0], dpo[-1], dpo[1:-1]
        # the paper's finding: online ≥ semi-online ≥ offline; it compares the semi-online values
        # with the two ends, not with each other (its s = 10 and s = 100 land close together)
        kept = all(last["mean"] <= r["mean"] <= first["mean"] for r in middle) and first["mean"] >= last["mean"]
        if kept:
            text += (f" The DPO regimes are in the paper's order: {_short(first)}"
                     + (f" ≥ {', '.join(_short(r) for r in middle)}" if middle else "") + f" ≥ {_short(last)}")
            if len(middle) >= 2 and any(a["mean"] < b["mean"] for a, b in zip(middle, middle[1:])):
                text += (" (between themselves, the semi-online runs go " + " ≥ ".join(
                    _short(r) for r in sorted(middle, key=lambda r: -r["mean"])) + ")")
        else:
            text += (" The DPO regimes are not in the order online ≥ semi-online ≥ offline: "
                     + " ≥ ".join(_short(r) for r in sorted(dpo, key=lambda r: -r["mean"])))
        gap, noise = first["mean"] - last["mean"], 2 * math.hypot(first["se"], last["se"])
        text += (f" (online − offline {_signed(gap)}, {'beyond' if abs(gap) > noise else 'within'} two standard "
                 f"errors, ±{noise:.3f}")
        diffs = _paired(first, last)
        if diffs:
            mean, se = across_seeds(diffs)
            text += (f"; paired by training seed {_signed(mean)} ± {se:.3f}, online higher on "
                     f"{sum(d > 0 for d in diffs)} of {len(diffs)} seeds")
        text += ")."
    clear = [_short(r) for r in regimes if r["mean"] - seed > 2 * r["se"] and r["se"] > 0]
    below = [_short(r) for r in regimes if r["mean"] <= seed]
    text += f" Above the seed by more than two standard errors: {', '.join(clear) if clear else 'none'}."
    if below:
        text += f" Not above the seed: {', '.join(below)}."
    return text


def below_seed_notes(summary: dict) -> list[str]:
    """For each regime whose mean is not above the seed model: how its training seeds fell, which
    tells a collapse on some seeds (others above the seed) from a drift of all of them."""
    seed, notes = summary["seed_model"]["mean"], []
    for r in summary["regimes"]:
        if r["mean"] > seed:
            continue
        below = [v for v in r["final"] if v <= seed]
        kind = ("every seed ended below it" if len(below) == len(r["final"]) else
                f"{len(below)} of {len(r['final'])} seeds ended below it and the rest above: a collapse on some "
                "seeds rather than a drift of all")
        notes.append(f"{_short(r)} is not above the seed ({r['mean']:.3f} against {seed:.3f}): {kind} "
                     f"(per seed {' '.join(f'{v:.3f}' for v in r['final'])}).")
    return notes


def summary_table(summary: dict) -> Table:
    seed = summary["seed_model"]
    headers = ["regime", "s", "seeds", "held-out (mean ± SE over seeds)", "Δ vs seed", "per seed"]
    extra = [k for k in ("greedy", ) if any(k in r for r in summary["regimes"])]
    headers += ["greedy (mean ± SE over seeds)"] * bool(extra)
    headers += ["gen tokens / run", "trained tokens / run", "wall s / run"]
    rows = [["seed model (SFT)", "–", "–", f"{seed['mean']:.3f} ± {seed['se']:.3f} (prompts)", "–", "–"]
            + (["–"] if extra else []) + ["–", "–", "–"]]
    if extra and "greedy" in seed:
        rows[0][6] = f"{seed['greedy']['mean']:.3f} ± {seed['greedy']['se']:.3f} (prompts)"
    for r in summary["regimes"]:
        s = r["sync_every"]
        row = [r["name"], "∞" if s == 0 else str(s), ",".join(map(str, r["seeds"])),
               f"{r['mean']:.3f} ± {r['se']:.3f}", _signed(r["mean"] - seed["mean"]),
               " ".join(f"{v:.3f}" for v in r["final"])]
        if extra:
            g = r.get("greedy")
            row.append(f"{g['mean']:.3f} ± {g['se']:.3f}" if g else "–")
        row += [f"{r.get('generated_tokens', 0) / 1000:.1f}k", f"{r.get('trained_tokens', 0) / 1000:.1f}k",
                f"{r.get('wall_s', 0.0):.0f}"]
        rows.append(row)
    return Table(headers, rows)


def plot_sync_every(summary: dict, path: str | Path) -> Path | None:
    """Held-out score against sync_every (1 … ∞), one point per regime with ±1 SE bars across seeds,
    the DPO regimes joined by a line, and the seed model as a band: the paper's finding in small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = summary["regimes"]
    if not regimes:
        return None
    syncs = sorted({r["sync_every"] for r in regimes}, key=lambda s: s or math.inf)
    xpos = {s: i for i, s in enumerate(syncs)}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    seed = summary["seed_model"]
    ax.axhspan(seed["mean"] - seed["se"], seed["mean"] + seed["se"], color="grey", alpha=0.2)
    ax.axhline(seed["mean"], color="grey", linestyle="--", linewidth=1, label="seed model (± SE)")
    dpo = sorted((r for r in regimes if r["algo"] == "dpo" and not r.get("optune")),
                 key=lambda r: xpos[r["sync_every"]])
    if dpo:
        ax.errorbar([xpos[r["sync_every"]] for r in dpo], [r["mean"] for r in dpo], yerr=[r["se"] for r in dpo],
                    marker="o", capsize=3, linewidth=1.6, label="DPO")
    markers = iter("s^Dv*")
    for r in regimes:
        if r in dpo:
            continue
        ax.errorbar([xpos[r["sync_every"]] + 0.08], [r["mean"]], yerr=[r["se"]], marker=next(markers, "x"),
                    capsize=3, linestyle="none", label=r["name"])
    ax.set_xticks(range(len(syncs)), ["∞ (offline)" if s == 0 else str(s) for s in syncs])
    ax.set_xlabel("sync_every s (steps between weight syncs to the generator)")
    ax.set_ylabel("\n".join(textwrap.wrap(summary.get("metric", "held-out score"), 40)))  # long labels outgrow the axis
    ax.set_title(f"{summary.get('task', '')}: mean ± SE over training seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
