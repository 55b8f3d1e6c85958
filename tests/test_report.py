"""Reports from synthetic run folders: table values, plots written, robustness to partial runs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgerl.cli import main
from bridgerl.report import build_report, load_run, regime_name
from bridgerl.report.plots import smooth
from bridgerl.report.table import comparison_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(folder: Path, algo: dict, sync: int, rewards: list[float], evals: dict[int, tuple[float, float]],
             final_step: int | None = None, optune: bool = False, tasks: dict | None = None) -> Path:
    """A run folder shaped like `bridgerl train`'s: step lines, evals merged into them, a final line."""
    folder.mkdir(parents=True)
    cfg = {"model": {"path": "m"}, "algo": algo, "rollout": {"sync_every": sync, "n": 4}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    steps = len(rewards)
    final_step = steps if final_step is None else final_step

    def eval_fields(step):
        mean, se = evals[step]
        out = {"eval/score": mean, "eval/score_se": se}
        for task, by_step in (tasks or {}).items():
            out[f"eval/{task}/score"], out[f"eval/{task}/score_se"] = by_step[step]
        return out

    if 0 in evals:
        lines.append({"step": 0, **eval_fields(0)})
    for t, r in enumerate(rewards, start=1):
        m = {"step": t, "reward/mean": r, "tokens/generated": 100.0 * t, "tokens/trained": 10.0,
             "time/step": 0.5, "loss": 0.1}
        if optune:
            m["reward/fresh_mean"] = r / 2
            if t % 2:
                m["entropy"], m["completion_length"] = 1.0, 12.0
        else:
            m["entropy"], m["completion_length"] = 2.0 - t / steps, 20.0 + t
        if t in evals and t != final_step:
            m |= eval_fields(t)
        lines.append(m)
    if final_step in evals:
        lines.append({"step": final_step, "final": True, **eval_fields(final_step)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return folder


@pytest.fixture
def runs(tmp_path):
    online = fake_run(tmp_path / "online", {"name": "dpo"}, 1, [0.1 * k for k in range(1, 13)],
                      {0: (0.2, 0.04), 6: (0.3, 0.05), 12: (0.45, 0.05)})
    offline = fake_run(tmp_path / "offline", {"name": "dpo"}, 0, [0.2] * 12, {0: (0.2, 0.04), 12: (0.25, 0.04)})
    optune = fake_run(tmp_path / "optune", {"name": "dpo", "optune": {"rho": 0.5}}, 1, [0.4] * 12,
                      {0: (0.2, 0.04), 12: (0.35, 0.05)}, optune=True)
    return [online, offline, optune]


def test_table_reports_final_and_start_scores_time_and_tokens(runs, tmp_path):
    path, table = build_report(runs, tmp_path / "report")
    rows = {r[0]: dict(zip(table.headers, r)) for r in table.rows}
    assert rows["online"]["held-out (final)"] == "0.450 ± 0.050"
    assert rows["online"]["held-out (step 0)"] == "0.200 ± 0.040"
    # evaluations after step 0: steps 6 and 12 → their mean, with the standard error of a mean of two
    assert rows["online"]["held-out (last 3 evals)"] == f"0.375 ± {math.sqrt(2 * 0.05 ** 2) / 2:.3f}"
    assert rows["offline"]["s"] == "∞" and rows["online"]["s"] == "1"
    assert rows["online"]["steps"] == "12"
    assert rows["online"]["wall s"] == "6"  # 12 steps × 0.5 s
    assert rows["online"]["gen tokens"] == f"{sum(100 * t for t in range(1, 13)) / 1000:.1f}k"
    assert rows["online"]["train reward (last 10)"] == f"{np.mean([0.1 * k for k in range(3, 13)]):.3f}"
    # OPTune's training reward is its fresh samples', not the stored pairs'
    assert rows["optune"]["train reward (last 10)"] == "0.200"
    text = path.read_text()
    assert "| online | dpo | 1 | 12 | 0.450 ± 0.050 |" in text
    assert table.text().splitlines()[0].startswith("run")


def test_plots_are_written_and_linked(runs, tmp_path):
    path, _ = build_report(runs, tmp_path / "report")
    text = path.read_text()
    for stem in ("heldout_score", "train_reward", "entropy", "completion_length"):
        png = tmp_path / "report" / "plots" / f"runs_{stem}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/runs_{stem}.png)" in text


def test_heldout_series_includes_mid_run_and_final_evaluations(runs):
    from bridgerl.report.runs import series

    run = load_run(runs[0])
    assert series(run, "eval/score") == ([0, 6, 12], [0.2, 0.3, 0.45])
    # entropy is logged only on OPTune's regeneration steps; missing points are skipped, not zeros
    xs, ys = series(load_run(runs[2]), "entropy")
    assert xs == list(range(1, 13, 2)) and set(ys) == {1.0}


def test_per_task_columns_and_summary_extras(tmp_path):
    mixed = fake_run(tmp_path / "mixed", {"name": "dpo"}, 1, [0.5] * 4, {0: (0.3, 0.1), 4: (0.5, 0.1)},
                     tasks={"arithmetic": {0: (0.2, 0.1), 4: (0.4, 0.1)}, "preference": {0: (0.4, 0.1), 4: (0.6, 0.1)}})
    (mixed / "summary.json").write_text(json.dumps({"hidden rule": {"mean": 0.75, "se": 0.05}}))
    single = fake_run(tmp_path / "single", {"name": "grpo"}, 1, [0.5] * 4, {4: (0.9, 0.02)})
    table = comparison_table([load_run(mixed), load_run(single)])
    rows = {r[0]: dict(zip(table.headers, r)) for r in table.rows}
    assert rows["mixed"]["arithmetic (final)"] == "0.400 ± 0.100"
    assert rows["mixed"]["preference (final)"] == "0.600 ± 0.100"
    assert rows["mixed"]["hidden rule"] == "0.750 ± 0.050"
    assert rows["single"]["hidden rule"] == "–" and rows["single"]["held-out (step 0)"] == "–"


def test_a_killed_run_with_a_partial_last_line_still_reports(tmp_path):
    run = fake_run(tmp_path / "killed", {"name": "dpo"}, 2, [0.1, 0.2, 0.3], {0: (0.1, 0.01), 3: (0.2, 0.02)})
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward/me')
    loaded = load_run(run)
    assert loaded.steps == 3 and loaded.score().mean == 0.2


def test_regime_names():
    assert regime_name({"algo": {"name": "dpo"}, "rollout": {"sync_every": 0}}) == "offline DPO"
    assert regime_name({"algo": {"name": "dpo"}, "rollout": {"sync_every": 10}}) == "semi-online DPO (s=10)"
    assert regime_name({"algo": {"name": "dpo"}, "rollout": {"sync_every": 1}}) == "online DPO (s=1)"
    assert regime_name({"algo": {"name": "grpo", "grpovi": {}},
                        "rollout": {"sync_every": 1}}) == "GRPO + VI"
    assert regime_name({"algo": {"name": "dpo", "optune": {"rho": 0.5}},
                        "rollout": {"sync_every": 1}}).startswith("OPTune")


def test_cli_report(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "online" in out and "0.450 ± 0.050" in out
    assert (tmp_path / "cli" / "report.md").exists()
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.integers(1, 12))
def test_smooth_is_a_trailing_moving_mean(values, window):
    out = smooth(values, window)
    assert len(out) == len(values)
    for i, v in enumerate(out):
        part = values[max(0, i - window + 1):i + 1]
        assert math.isclose(v, sum(part) / len(part), rel_tol=1e-9, abs_tol=1e-6)
