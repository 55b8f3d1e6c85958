"""The demo's report.md: the comparison, the reward-model leg and the multi-task table."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from ..report import Section, Table, load_run, write_report
from ..report.runs import Estimate
from ..report.summary import SUMMARY, below_seed_notes, headline, plot_sync_every, summary_table, write_summary
from .settings import DemoSettings
from .stages import StageResult, StageRunner

__all__ = ["demo_report", "machine_line"]


def machine_line() -> str:
    load = ""
    if hasattr(os, "getloadavg"):
        one, five, _ = os.getloadavg()
        load = f", load average {one:.1f} (1 min) / {five:.1f} (5 min) when the report was written"
    import torch

    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}){load}")


def _est(d: dict) -> str:
    return Estimate(d["mean"], d.get("se")).format()


def demo_report(out: Path, st: DemoSettings, seed: int, quick: bool, runner: StageRunner,
                comparison: list, preference: list, mixed: StageResult,
                cross: StageResult, summary: dict, elapsed: float, jobs: int) -> tuple[Path, list[tuple[str, Table]]]:
    def runs_of(pairs):
        loaded = []
        for regime, res in pairs:
            run = load_run(res.folder, name=regime.name)
            loaded.append(run)
        return loaded

    seed_res = runner.results[next(k for k in runner.results if k.startswith("seed"))]
    rm_res = runner.results[next(k for k in runner.results if k.startswith("reward model"))]
    acc = seed_res.result["accuracy"]

    first_seed = [(regime, results[0]) for regime, results in comparison]
    for old in (out / "plots").glob("*.png"):  # the demo folder's own plots from an earlier report
        old.unlink()
    write_summary(out / SUMMARY, summary)
    sync_png = plot_sync_every(summary, out / "plots" / "heldout_vs_sync_every.png")
    seeds = summary["regimes"][0]["seeds"] if summary["regimes"] else []
    verifiable = Section(
        f"Verifiable task ({st.rl_task}): offline → semi-online → online", runs_of(first_seed), slug="verifiable",
        table=summary_table(summary),
        note=(f"Every run starts from the same seed model with the same budget: {st.rl_budget()}, max "
              f"{st.max_new_tokens} new tokens, lr {st.lr} after {st.warmup_steps} warm-up steps, training seeds "
              f"{seeds}. *held-out* is the final model's {summary['metric']}, mean ± standard error across "
              "the training seeds; every model is scored on the same prompts with the same random stream, so "
              "the seed model's own prompt-sampling error (shown on its row) is shared by every row and does not "
              f"enter the differences. *greedy* is the run's own last evaluation (greedy, {st.num_eval} prompts; "
              f"seed model greedy {_est(acc)}): it flips on near-ties and is noisier. DPO pairs a random correct "
              "with a random incorrect sample; the reference follows the generator except offline. The plots "
              f"against step show training seed {seeds[0] if seeds else '?'} of each regime. "
              "GRPO + VI is not run here: on binary rewards the variance increase returns the rewards "
              "unchanged (algorithms.md §6), so it would equal GRPO; it runs on the reward-model leg below."),
        extra=(f"![held-out vs sync_every](plots/{sync_png.name})" if sync_png else ""))

    pref_runs = runs_of(preference)
    preference_section = Section(
        "Non-verifiable task: a tiny reward model on builtin:preference", pref_runs, slug="reward_model",
        note=(f"The reward model (Bradley–Terry, {st.rm_steps} steps) ranks {rm_res.result['heldout_accuracy']:.1%} "
              f"of {rm_res.result['heldout_pairs']} held-out pairs correctly. Held-out score is its mean score of "
              "greedy replies; *hidden rule* is the share of those replies that say \"thanks\", the rule behind "
              f"the preference data that the policy can only learn through the reward model (seed: "
              f"{_est(seed_res.result['hidden_rule'])}). {st.pref_steps} steps each; DPO pairs best with worst. "
              "A reward-model score near its top with a low hidden-rule rate means the policy found replies the "
              "reward model likes that break the rule (e.g. \"thankso.\"): reward hacking, in small."))

    cross_rows = [[name] + [_est(v[k]) for k in ("arithmetic", "preference", "hidden rule")]
                  for name, v in cross.result.items()]
    cross_table = Table(["model", f"{st.rl_task} accuracy", "reward-model score", "hidden rule"], cross_rows)
    multitask = Section(
        "Multi-task: arithmetic and preference prompts in one run (online DPO)",
        [load_run(mixed.folder, name="online DPO, mixed")], table=cross_table, slug="multitask",
        note=("Each model is evaluated on both tasks' held-out prompts (the paper's Table 3 in small). The mixed "
              "run sees both kinds of prompt in every batch; each is scored by its own reward "
              "(Math-Verify, the reward model)."))

    wall = sum(r.wall_s for r in runner.results.values())
    notes = below_seed_notes(summary)
    preamble = (
        f"**{headline(summary)}**\n\n"
        + "".join(f"- {note}\n" for note in notes) + ("\n" if notes else "")
        + f"`bridgerl demo{' --quick' if quick else ''} --seed {seed}` on {machine_line()}.\n\n"
        + (f"Every stage was cached: this invocation only rewrote the report; the stages' wall times sum to "
           f"{wall:.0f} s as they ran. " if all(r.cached for r in runner.results.values()) else
           f"This invocation took {elapsed:.0f} s wall with {jobs} training run(s) at once; stage wall times sum "
           f"to {wall:.0f} s (cached stages count the time they took when they ran). ")
        + "Numbers are what the runs measured; with so few evaluation prompts, differences within about two "
        "standard errors are noise."
        + (f"\n\n`--quick` runs the comparison on a fifth of the full demo's steps ({st.rl_budget()} at lr "
           f"{st.lr:g}, one semi-online regime, {len(seeds)} training seeds). With two seeds, regimes closer than "
           "about two standard errors are not told apart; docs/demo.md has the same settings over 8 training "
           "seeds, and the full `bridgerl demo` is the comparison." if quick else ""))
    sections = [verifiable, preference_section, multitask]
    path = write_report(sections, out, title="bridgerl demo", preamble=preamble)
    return path, [(s.title, s.comparison()) for s in sections]
