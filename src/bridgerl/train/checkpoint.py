"""Atomic, resumable checkpoints: what a run's state is (`run_state` / `load_run_state`), and how it is
written: to a temp folder, renamed into place, and a `latest` marker replaced last, so a kill at any
moment leaves the last good checkpoint intact."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..distributed.fsdp import is_distributed, push_weights

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


# Config sections whose change makes a resumed run a different run (train.steps, eval, log may change).
RUN_DEFINING = ("model", "reference", "algo", "data", "rollout", "rewards", "optim")


def run_state(run) -> dict:
    """Everything an exact resume needs: weights, optimizer, schedule, data position, RNGs, the rollout
    cache, OPTune's pool, monitors, and the config."""
    state = {
        "step": run.step,
        "scheduler": run.scheduler.state_dict(),
        "stream": run.stream.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "sample": run.sample_rng.get_state(), "pair": run.pair_rng.get_state()},
        "cache": {"version": run.cache.version,
                  "entries": {k: (v[0].to("cpu"), v[1].cpu()) for k, v in run.cache.entries.items()}},
        "config": run.cfg.model_dump(mode="json"),
    }
    if not is_distributed():  # with --nproc N the sharded weights and optimizer go through DCP (save_run)
        state["policy"] = {k: v.detach().cpu() for k, v in run.policy.state_dict().items()}
        state["optimizer"] = run.optimizer.state_dict()
    if run.optune_pool is not None:
        state["optune_pool"] = run.optune_pool.state_dict()
    if run.monitor is not None:
        state["monitor"] = run.monitor.state_dict()
    if run.generator.version != run.step or run.cfg.rollout.sync_every == 0:
        state["generator"] = run.generator.state_dict()
    else:
        state["generator"] = {"version": run.generator.version}  # equal to the policy: no second copy
    if run.reference is not None and run.cfg.reference.sync == "with_generator":
        state["reference"] = {k: v.cpu() for k, v in run.reference.state_dict().items()}
    return state


def load_run_state(run, state: dict) -> None:
    run.step = state["step"]
    if "policy" in state:  # absent in a sharded checkpoint: load_sharded has loaded them
        run.policy.load_state_dict(state["policy"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.stream.load_state_dict(state["stream"])
    torch.set_rng_state(state["rng"]["torch"])
    run.sample_rng.set_state(state["rng"]["sample"])
    run.pair_rng.set_state(state["rng"]["pair"])
    if "weights" in state["generator"]:
        run.generator.load_state_dict(state["generator"])
    else:
        push_weights(run.generator, run.policy, state["generator"]["version"])
    if "reference" in state:
        run.reference.load_state_dict(state["reference"])
    run.cache.version = state["cache"]["version"]
    run.cache.entries = {k: (v[0].to(run.device), v[1]) for k, v in state["cache"]["entries"].items()}
    if run.optune_pool is not None:
        run.optune_pool.load_state_dict(state["optune_pool"])
    if run.monitor is not None:
        run.monitor.load_state_dict(state["monitor"])


def save_run(run) -> Path:
    if is_distributed():
        from ..distributed.checkpoint import save_sharded
        return save_sharded(run.out_dir, run.step, run.policy, run.optimizer, run_state(run),
                            run.cfg.train.keep_checkpoints)
    return save_checkpoint(run.out_dir, run.step, run_state(run), run.cfg.train.keep_checkpoints)


def changed_keys(saved: dict, current: dict, sections=RUN_DEFINING) -> list[str]:
    """Dotted keys under `sections` whose values differ between two config dumps."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
        return out

    a = flat({k: saved.get(k) for k in sections})
    b = flat({k: current.get(k) for k in sections})
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class ResumeConfigError(ValueError):
    """--resume with a config that would make a different run."""


def resume_run(run, force: bool = False) -> None:
    """Load the run folder's latest checkpoint into `run`; refuse (unless `force`) when the config differs
    in a key that changes the run, naming the keys."""
    ckpt = latest_checkpoint(run.out_dir)
    if ckpt is None:
        print(f"[bridgerl] --resume: no checkpoint in {run.out_dir}/checkpoints; starting from step 0")
        return
    if is_distributed():
        from ..distributed.checkpoint import load_sharded
        state = load_sharded(ckpt, run.policy, run.optimizer)
    else:
        state = load_checkpoint(ckpt)
    changed = changed_keys(state["config"], run.cfg.model_dump(mode="json"))
    if changed and not force:
        raise ResumeConfigError(
            f"--resume: the config differs from the checkpoint's in {', '.join(changed)}; that would be a different "
            f"run. Resume with the saved config ({run.out_dir}/config.yaml), train into a new --out, or pass --force.")
    load_run_state(run, state)
    print(f"[bridgerl] resumed from {ckpt} at step {run.step}")
