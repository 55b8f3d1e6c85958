"""summary.json (the demo's machine-readable result): schema check, headline, table, the plot of
held-out score against sync_every, and `bridgerl report` reading a demo folder."""
import json
import math

import pytest

from bridgerl.cli import main
from bridgerl.report import build_report
from bridgerl.report.summary import across_seeds, headline, read_summary, summary_table, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def regime(name, algo, s, finals):
    mean, se = across_seeds(finals)
    return {"name": name, "algo": algo, "sync_every": s, "steps": 100, "seeds": list(range(len(finals))),
            "final": finals, "mean": mean, "se": se, "generated_tokens": 1500.0, "trained_tokens": 900.0,
            "wall_s": 12.0}


def summary(online=(0.30, 0.32, 0.31), offline=(0.18, 0.20, 0.19)):
    return {"task": "arithmetic", "metric": "sampled accuracy", "seed_model": {"mean": 0.22, "se": 0.01},
            "regimes": [regime("offline DPO", "dpo", 0, list(offline)),
                        regime("semi-online DPO (s=5)", "dpo", 5, [0.26, 0.27, 0.25]),
                        regime("online DPO (s=1)", "dpo", 1, list(online)),
                        regime("GRPO", "grpo", 1, [0.28, 0.24, 0.26])]}


def test_across_seeds_is_the_standard_error_of_the_mean():
    mean, se = across_seeds([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(se, 1.0 / math.sqrt(3))
    assert across_seeds([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError):
        across_seeds([])


def test_headline_states_gains_order_and_who_falls_below_the_seed():
    text = headline(summary())
    assert "online DPO +0.090 ± 0.006" in text
    assert "offline DPO −0.030 ± 0.006" in text and "s=5 +0.040" in text
    assert "in the paper's order: online DPO ≥ s=5 ≥ offline DPO" in text
    assert "online − offline +0.120, beyond two standard errors" in text
    assert "paired by training seed +0.120 ± 0.000, online higher on 3 of 3 seeds" in text
    assert "more than two standard errors: s=5, online DPO, GRPO." in text  # GRPO: +0.04 against 2 × 0.012
    assert "Not above the seed: offline DPO." in text
    # online below semi-online: the order is reported as broken, not claimed
    broken = headline(summary(online=(0.24, 0.25, 0.23)))
    assert "not in the order" in broken and "s=5 ≥ online DPO ≥ offline DPO" in broken
    # two semi-online regimes out of order between themselves, both between online and offline: the
    # order holds (the paper compares semi-online with the ends), and the inner order is reported
    two = summary()
    two["regimes"].insert(1, regime("semi-online DPO (s=20)", "dpo", 20, [0.27, 0.28, 0.26]))
    inner = headline(two)
    assert "in the paper's order: online DPO ≥ s=5, s=20 ≥ offline DPO" in inner
    assert "between themselves, the semi-online runs go s=20 ≥ s=5" in inner
    two["regimes"][1] = regime("semi-online DPO (s=20)", "dpo", 20, [0.17, 0.18, 0.16])  # below offline
    assert "not in the order" in headline(two)
    noisy = summary(online=(0.40, 0.20, 0.30), offline=(0.10, 0.40, 0.25))
    assert "within two standard errors" in headline(noisy)
    # paired: seed by seed (0.40−0.10, 0.20−0.40, 0.30−0.25)
    assert "paired by training seed +0.050 ± 0.144, online higher on 2 of 3 seeds" in headline(noisy)


def test_regimes_not_above_the_seed_say_how_their_seeds_fell():
    from bridgerl.report.summary import below_seed_notes

    assert below_seed_notes(summary()) == [
        "offline DPO is not above the seed (0.190 against 0.220): every seed ended below it (per seed 0.180 0.200 0.190)."]
    split = below_seed_notes(summary(offline=(0.28, 0.10, 0.12)))
    assert len(split) == 1 and "2 of 3 seeds ended below it and the rest above: a collapse" in split[0]
    assert below_seed_notes(summary(offline=(0.30, 0.31, 0.29))) == []


def test_table_has_one_row_per_regime_plus_the_seed():
    table = summary_table(summary())
    assert [r[0] for r in table.rows] == ["seed model (SFT)", "offline DPO", "semi-online DPO (s=5)",
                                          "online DPO (s=1)", "GRPO"]
    rows = {r[0]: dict(zip(table.headers, r)) for r in table.rows}
    assert rows["offline DPO"]["s"] == "∞" and rows["offline DPO"]["Δ vs seed"] == "−0.030"
    assert rows["online DPO (s=1)"]["per seed"] == "0.300 0.320 0.310"


def test_schema_errors_say_what_is_missing(tmp_path):
    bad = summary()
    del bad["regimes"][1]["final"]
    with pytest.raises(ValueError, match="lacks final"):
        write_summary(tmp_path / "summary.json", bad)
    (tmp_path / "summary.json").write_text(json.dumps({"regimes": []}))
    with pytest.raises(ValueError, match="seed_model"):
        read_summary(tmp_path)
    with pytest.raises(FileNotFoundError, match="bridgerl demo"):
        read_summary(tmp_path / "elsewhere")


def test_bridgerl_report_reads_a_demo_folder(tmp_path, capsys):
    demo = tmp_path / "demo"
    demo.mkdir()
    write_summary(demo / "summary.json", summary())
    path, table = build_report([demo], tmp_path / "rep")
    text = path.read_text()
    assert headline(summary()) in text and "| online DPO (s=1) |" in text
    assert (tmp_path / "rep" / "plots" / "heldout_vs_sync_every_0.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["report", str(demo), "--out", str(tmp_path / "cli")]) == 0
    assert "0.310 ± 0.006" in capsys.readouterr().out
