"""PNG plots against step, one line per run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from .runs import RunData, reward_key, series

__all__ = ["PLOTS", "plot_metric", "smooth"]

# file stem → (y label, metric key or None for the run's training-reward key, lines to read, smooth?)
PLOTS = {
    "heldout_score": ("held-out score (greedy)", "eval/score", "all", False),
    "train_reward": ("training reward (moving mean)", None, "steps", True),
    "entropy": ("token entropy of samples (moving mean)", "entropy", "steps", True),
    "completion_length": ("completion length, tokens (moving mean)", "completion_length", "steps", True),
}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving mean; per-step training metrics of small batches are too noisy to read raw."""
    if window <= 1 or not values:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metric(runs: list[RunData], stem: str, path: Path, title: str | None = None) -> Path | None:
    """One PNG for metric `stem` of PLOTS; None when no run logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ylabel, key, which, smoothed = PLOTS[stem]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    drawn = 0
    for run in runs:
        lines = run.lines if which == "all" else run.step_lines
        xs, ys = series(run, key or reward_key(run), lines)
        if not xs:
            continue
        if smoothed:
            ys = smooth(ys, max(1, len(ys) // 10))
        ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, markersize=3, linewidth=1.4, label=run.name)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
