"""The run-comparison table: one row per run, as Markdown (report.md) and as plain text (terminal)."""
from __future__ import annotations

from dataclasses import dataclass

from .runs import Estimate, RunData, regime_name

__all__ = ["Table", "comparison_table"]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)

    def text(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]

        def fmt(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        return "\n".join([fmt(self.headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in self.rows])


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _tokens(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def comparison_table(runs: list[RunData], label: str = "run") -> Table:
    """Held-out score (final, mean of the last three evaluations, and at step 0; mean ± standard error over
    the evaluation prompts), per-task
    scores when a run mixes tasks, extra measurements from summary.json, training reward over the last
    steps, wall time of the training steps, and generated / trained tokens."""
    tasks = sorted({t for r in runs for t in r.tasks()}) if any(len(r.tasks()) > 1 for r in runs) else []
    extras = sorted({k for r in runs for k in r.extra})
    headers = [label, "algo", "s", "steps", "held-out (final)", "held-out (last 3 evals)", "held-out (step 0)"]
    headers += [f"{t} (final)" for t in tasks] + extras
    headers += ["train reward (last 10)", "wall s", "gen tokens", "trained tokens"]
    rows = []
    for r in runs:
        algo = (r.config.get("algo") or {}).get("name", "?")
        s = (r.config.get("rollout") or {}).get("sync_every")
        final, late, start = r.score(), r.late_score(), r.score(which="start")
        row = [r.name, algo, "∞" if s == 0 else str(s), str(r.steps)]
        row += [e.format() if e else "–" for e in (final, late, start)]
        for t in tasks:
            est = r.score(t)
            row.append(est.format() if est else "–")
        for k in extras:
            v = r.extra.get(k)
            est = Estimate(v["mean"], v.get("se")) if isinstance(v, dict) else Estimate(v) if v is not None else None
            row.append(est.format() if est else "–")
        row += [_num(r.train_reward()), f"{r.wall_s:.0f}", _tokens(r.total("tokens/generated")),
                _tokens(r.total("tokens/trained"))]
        rows.append(row)
    return Table(headers, rows)


def default_label(run: RunData) -> str:
    return regime_name(run.config)
