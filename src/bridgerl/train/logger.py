"""Metrics to `metrics.jsonl` (one line per step), TensorBoard and optionally W&B; a progress bar."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, cfg, resume: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        if resume and self.path.exists():
            self._truncate_after_checkpoint(out_dir)
        elif self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        self.cfg = cfg
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:
                print("[bridgerl] tensorboard is not installed; logging to metrics.jsonl only")
        if cfg.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(out_dir), resume="allow")

    def _truncate_after_checkpoint(self, out_dir: Path) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one clean run. A line
        the killed run left half-written is dropped too; the file is replaced in one rename, so a kill
        during the resume itself cannot lose it."""
        from .checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out_dir)
        last = json.loads((ckpt / "meta.json").read_text())["step"] if ckpt else 0
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # only the last line can be cut short; nothing after it was written
                continue
            if record["step"] <= last and not record.get("final"):
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict, final: bool = False) -> None:
        record = {"step": step, **({"final": True} if final else {}), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def progress(self, total: int, initial: int = 0):
        return _Progress(total, initial, enabled=self.cfg.progress)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=None, mininterval=1.0)

    def update(self, metrics: dict) -> None:
        if self.bar:
            shown = {"reward": metrics.get("reward/mean"), "loss": metrics.get("loss")}
            if "eval/score" in metrics:
                shown["eval"] = metrics["eval/score"]
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class SilentLogger:
    """What ranks > 0 log with --nproc N: nothing (rank 0 writes metrics.jsonl for the run)."""

    def log(self, step: int, metrics: dict, final: bool = False) -> None:
        pass

    def progress(self, total: int, initial: int = 0):
        return _Progress(total, initial, enabled=False)

    def close(self) -> None:
        pass
