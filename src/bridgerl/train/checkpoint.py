"""Atomic, resumable checkpoints: everything written to a temp folder, renamed into place, and a
`latest` marker replaced last, so a kill at any moment leaves the last good checkpoint intact."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

MARKER = "latest"


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    marker_tmp = ckpt_root / f".{MARKER}.tmp"
    marker_tmp.write_text(final.name)
    os.replace(marker_tmp, ckpt_root / MARKER)
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt_root = Path(run_dir) / "checkpoints"
    marker = ckpt_root / MARKER
    if not marker.exists():
        return None
    path = ckpt_root / marker.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: str | Path) -> dict:
    # Our own file, holding RNG states and rollout records as well as tensors.
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
