"""Run reports: a Markdown file with comparison tables and PNG plots against step.

    from bridgerl.report import build_report
    build_report(["runs/online", "runs/offline"], "runs/report")   # → runs/report/report.md

`bridgerl report RUN_DIR... --out DIR` does the same from the command line; the demo builds its
report with `write_report` and one `Section` per leg. A demo folder (one holding summary.json, see
summary.py) given to `build_report` is reported from its summary: the headline, the across-seed
table and the plot of held-out score against sync_every.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .plots import PLOTS, plot_metric
from .runs import Estimate, RunData, load_run, regime_name
from .summary import below_seed_notes, headline, is_summary_folder, plot_sync_every, read_summary, summary_table
from .table import Table, comparison_table

__all__ = ["Section", "write_report", "build_report", "load_run", "comparison_table", "RunData", "Estimate",
           "Table", "regime_name"]


@dataclass
class Section:
    title: str
    runs: list[RunData]
    note: str = ""  # Markdown shown under the table
    extra: str = ""  # Markdown shown after the plots
    table: Table | None = field(default=None)
    slug: str | None = None  # plot file prefix; default: from the title

    def comparison(self) -> Table:
        if self.table is None:
            self.table = comparison_table(self.runs)
        return self.table


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "runs"


def write_report(sections: list[Section], out_dir: str | Path, title: str = "bridgerl report",
                 preamble: str = "", epilogue: str = "") -> Path:
    """Write `out_dir/report.md` and its PNGs (`out_dir/plots/<section>_<metric>.png`)."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    if preamble:
        parts += [preamble.strip(), ""]
    for sec in sections:
        if len(sections) > 1:
            parts += [f"## {sec.title}", ""]
        parts += [sec.comparison().markdown(), ""]
        if sec.note:
            parts += [sec.note.strip(), ""]
        slug = sec.slug or (_slug(sec.title) if len(sections) > 1 else "runs")
        images = []
        for stem in PLOTS:
            png = plot_metric(sec.runs, stem, out / "plots" / f"{slug}_{stem}.png", title=sec.title)
            if png is not None:
                images.append(f"![{stem.replace('_', ' ')}](plots/{png.name})")
        if images:
            parts += [" ".join(images[:2]), "", " ".join(images[2:]), ""]
        if sec.extra:
            parts += [sec.extra.strip(), ""]
    parts += [_column_notes(), ""]
    if epilogue:
        parts += [epilogue.strip(), ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def _column_notes() -> str:
    return ("Columns: *held-out* is the score on the held-out split (accuracy for verifiable tasks, mean "
            "reward-model score otherwise), mean ± standard error over the evaluation prompts, at the final "
            "evaluation; *last 3 evals* averages the last three evaluations (independent standard errors "
            "assumed), which steadies a toy run's swings; *step 0* is the evaluation before training. "
            "*train reward* is the mean reward of the training samples over the last 10 steps (OPTune: its "
            "freshly generated samples only; offline: samples of the seed). *wall s* sums the training "
            "steps' time (generation, reward, update), without evaluation. *s* is `rollout.sync_every` "
            "(∞ = offline).")


def build_report(run_dirs: list[str | Path], out_dir: str | Path,
                 title: str = "bridgerl report") -> tuple[Path, Table]:
    """Report for any run folders: one table and one set of plots; returns (report.md, table)."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    summaries = [d for d in run_dirs if is_summary_folder(d)]
    if summaries:
        if len(summaries) < len(run_dirs):
            raise ValueError("give either demo folders (with summary.json) or run folders, not both")
        return _summary_report(summaries, out_dir, title)
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same folder name under different parents: use the full path
        for r in runs:
            r.name = str(r.path)
    section = Section("runs", runs)
    path = write_report([section], out_dir, title)
    return path, section.comparison()


def _summary_report(folders: list[str | Path], out_dir: str | Path, title: str) -> tuple[Path, Table]:
    """Report of one or more demo folders from their summary.json: headline, table, sync plot each."""
    out = Path(out_dir)
    parts, tables = [f"# {title}", ""], []
    for k, folder in enumerate(folders):
        summary = read_summary(folder)
        table = summary_table(summary)
        tables.append(table)
        png = plot_sync_every(summary, out / "plots" / f"heldout_vs_sync_every_{k}.png")
        parts += [f"## {folder}: {summary.get('task', '')}", "", f"**{headline(summary)}**", ""]
        parts += [f"- {note}" for note in below_seed_notes(summary)] + [""] * bool(below_seed_notes(summary))
        parts += [table.markdown(), ""]
        if png is not None:
            parts += [f"![held-out vs sync_every](plots/{png.name})", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path, Table(tables[0].headers, [row for t in tables for row in t.rows])
