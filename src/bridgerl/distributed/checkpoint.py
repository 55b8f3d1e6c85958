"""Sharded, atomic, resumable checkpoints for FSDP2 ranks (torch.distributed.checkpoint), in the same
layout as train/checkpoint.py: `checkpoints/step-N/` renamed into place from a temp folder, then the
`latest` marker. Inside: `dcp/` (model and optimizer shards, each rank writing its own), `state.pt`
(rank 0: data position, scheduler, config, run state), `rank-R.pt` (each rank's RNG), `meta.json`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .fsdp import rank_and_world

MARKER = "latest"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_sharded(run_dir: str | Path, step: int, model, optimizer, state: dict, keep: int = 2) -> Path:
    """Every rank calls this. `state`: rank 0's picklable run state (the other ranks' is ignored)."""
    rank, world = rank_and_world()
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rank-{rank}.pt")
    if rank == 0:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": world, "format": "dcp"}))
    _barrier()  # every shard is on disk before the folder becomes visible
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / f".{MARKER}.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / MARKER)
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def load_sharded(path: str | Path, model, optimizer) -> dict:
    """Loads the model and optimizer shards and this rank's RNG; returns rank 0's run state."""
    path = Path(path)
    rank, world = rank_and_world()
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("world_size") != world:
        raise RuntimeError(f"{path} was written by {meta.get('world_size')} ranks and this run has {world}; "
                           f"resume with --nproc {meta.get('world_size')} (resharding to another count is not "
                           "supported yet)")
    model_state, optim_state = get_state_dict(model, optimizer)
    box = {"model": model_state, "optim": optim_state}
    dcp.load(box, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=box["optim"])
    # Our own files, holding RNG states and rollout records as well as tensors.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if isinstance(state.get("rng"), dict):  # each rank continues its own torch RNG stream
        state["rng"]["torch"] = torch.load(path / f"rank-{rank}.pt", weights_only=False)["torch"]
    else:
        torch.set_rng_state(torch.load(path / f"rank-{rank}.pt", weights_only=False)["torch"])
    return state


def save_final_hf(model, tokenizer, out_dir: str | Path) -> None:
    """An ordinary HF folder from rank 0 (every rank joins the gather)."""
    from .fsdp import full_state_dict

    full = full_state_dict(model)
    if full is not None:
        model.save_pretrained(out_dir, state_dict=full)
        tokenizer.save_pretrained(out_dir)
    _barrier()


def latest_sharded(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    marker = root / MARKER
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "meta.json").exists() else None
