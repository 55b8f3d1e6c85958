"""`bridgerl monitor RUN_DIR`: pathway metrics of every saved checkpoint of a run, plotted beside its
loss and held-out score."""
from __future__ import annotations

import json
from pathlib import Path

from ..monitor.live import probe_from_rows
from ..monitor.pathways import PathwayMonitor


def monitor_run(run_dir: str | Path, tau: float = 0.7, probe_samples: int = 32) -> Path:
    """Pathway metrics of every saved checkpoint of a run, plotted beside its loss and held-out score."""
    from ..config import load_config
    from ..models import load_causal_lm, load_tokenizer
    from ..train.checkpoint import load_checkpoint
    from ..train.run import build_rows

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no saved steps; train with train.checkpoint_every=N "
                                "and train.keep_checkpoints large enough to keep them")
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_causal_lm(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
    train_rows, _ = build_rows(cfg)
    ids, mask = probe_from_rows(tokenizer, train_rows, probe_samples)
    monitor = PathwayMonitor(ids, mask, tau=tau)
    records = []
    for ckpt in ckpts:
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["policy"])
        records.append({"step": state["step"], **monitor.measure(model)})
    out = run_dir / "pathways.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    _plot(run_dir, records)
    return out


def _plot(run_dir: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    panels = [("loss", [(m["step"], m["loss"]) for m in lines if "loss" in m]),
              ("eval/score", [(m["step"], m["eval/score"]) for m in lines if "eval/score" in m]),
              ("pathways/distance", [(r["step"], r["pathways/distance"]) for r in records]),
              ("pathways/smoothness", [(r["step"], r.get("pathways/smoothness", float("nan"))) for r in records])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (name, points) in zip(axes, panels):
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run_dir / "pathways.png", dpi=110)
    plt.close(fig)
