"""What a run's state is (`run_state` / `load_run_state`) and how it is written: atomic, resumable
checkpoints that hold only data, tensors in safetensors and the rest in JSON.

Loading a checkpoint never unpickles anything, so a checkpoint from someone else cannot run
code. A state is a nested structure of dicts, lists, tuples, tensors, numbers, strings, None
and the dataclasses listed in `DATACLASSES` (the rollout cache's `Rollouts`); it comes back
exactly as it went in (dtypes, shapes, int dict keys, tuples vs lists, NaN). Anything else is
refused at save time with the key path where it sits.

Atomicity: everything is written to a temp folder, flushed to disk, renamed into place, and the
`latest` marker is replaced last, so a kill or a full disk at any moment leaves the previous
checkpoint intact and `--resume` starts from it.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ..rollout.types import Rollouts
from ..distributed.fsdp import is_distributed, push_weights

MARKER = "latest"
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
FORMAT = 1
# Dataclasses a checkpoint may hold, by name; loading builds only these (never an arbitrary class).
DATACLASSES: dict[str, type] = {"Rollouts": Rollouts}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be read; the message says what to do."""


# ----------------------------------------------------------------------------- encoding


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_id: dict[int, str] = {}
        self._storages: set[int] = set()

    def tensor(self, t: torch.Tensor) -> str:
        original = id(t)
        if original in self._by_id:  # the same tensor twice (tied weights): stored once
            return self._by_id[original]
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        whole = t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not whole or ptr in self._storages:  # safetensors wants each tensor to own its memory
            t = t.clone(memory_format=torch.contiguous_format)
        if ptr is not None:
            self._storages.add(t.untyped_storage().data_ptr())
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t
        self._by_id[original] = key
        return key

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"$tensor": self.tensor(value)}
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"$tuple": items}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.encode(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            for k in value:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise CheckpointError(f"cannot checkpoint the key {k!r} ({type(k).__name__}) at "
                                          f"'{path or '(top)'}': dict keys must be strings or ints")
            return {"$dict": [[k, self.encode(v, f"{path}[{k!r}]")] for k, v in value.items()]}
        if is_dataclass(value) and not isinstance(value, type):
            name = type(value).__name__
            if DATACLASSES.get(name) is not type(value):
                raise CheckpointError(f"cannot checkpoint a {name} at '{path}': add it to "
                                      "bridgerl.train.checkpoint.DATACLASSES or store its fields")
            return {"$dataclass": name,
                    "fields": {f.name: self.encode(getattr(value, f.name), f"{path}.{f.name}") for f in fields(value)}}
        raise CheckpointError(f"cannot checkpoint a {type(value).__name__} at '{path or '(top)'}': a checkpoint "
                              "holds tensors, numbers, strings, None, lists, tuples and dicts; convert it "
                              "(e.g. its state_dict(), or a tensor)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$float" in value:
        return float(value["$float"])
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    if "$dict" in value:
        return {k: _decode(v, tensors) for k, v in value["$dict"]}
    if "$dataclass" in value:
        cls = DATACLASSES.get(value["$dataclass"])
        if cls is None:
            raise CheckpointError(f"the checkpoint holds a {value['$dataclass']!r}, which this version does not know")
        return cls(**{k: _decode(v, tensors) for k, v in value["fields"].items()})
    return {k: _decode(v, tensors) for k, v in value.items()}


# ----------------------------------------------------------------------------- files


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_state(folder: Path, state: dict) -> None:
    """`state` as state.json + tensors.safetensors in `folder` (which must exist)."""
    from safetensors.torch import save

    enc = _Encoder()
    tree = enc.encode(state, "")
    _write(folder / TENSOR_FILE, save(enc.tensors, metadata={"format": str(FORMAT)}))
    _write(folder / STATE_FILE, json.dumps({"format": FORMAT, "state": tree}).encode())


def read_state(folder: Path) -> dict:
    """The state written by `write_state`. Reads JSON and safetensors only: no code runs."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / STATE_FILE).exists():
        if (folder / "state.pt").exists():
            return _read_legacy(folder / "state.pt")
        raise CheckpointError(f"{folder} holds no {STATE_FILE}; it is not a bridgerl checkpoint")
    doc = json.loads((folder / STATE_FILE).read_text())
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: checkpoint format {doc.get('format')!r}; this version reads {FORMAT}")
    tensors = load_file(str(folder / TENSOR_FILE), device="cpu")
    return _decode(doc["state"], tensors)


def _read_legacy(path: Path) -> dict:
    # Older bridgerl wrote one pickled state.pt. Only the restricted unpickler may read it: it
    # builds tensors and plain containers and refuses any other object, so nothing can run.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — UnpicklingError or whatever a hostile file raises
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that holds Python objects beyond tensors and plain data, "
            "and unpickling those can run code. bridgerl checkpoints are now state.json + tensors.safetensors; "
            f"restart the run without --resume, or re-save it with the version that wrote it ({exc})") from None


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write_state(tmp, state)
        _write(tmp / "meta.json", json.dumps({"step": step}).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        marker_tmp = ckpt_root / f".{MARKER}.tmp"
        _write(marker_tmp, final.name.encode())
        os.replace(marker_tmp, ckpt_root / MARKER)
        _fsync_dir(ckpt_root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder, never the previous checkpoint
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = latest_checkpoint(run_dir)
            raise CheckpointError(
                f"checkpoint of step {step} not written: the disk under {ckpt_root} is full. "
                + (f"The previous checkpoint {previous.name} is intact; " if previous else "")
                + "free space (or lower train.keep_checkpoints) and resume with --resume") from exc
        raise
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
    return path if (path / STATE_FILE).exists() or (path / "state.pt").exists() else None


def load_checkpoint(path: str | Path) -> dict:
    return read_state(Path(path))


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
    if run.alarm is not None:
        state["alarm"] = run.alarm.state_dict()
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
        push_weights(run.generator, run.policy, state["generator"]["version"], check=run.sync_check,
                     probe=run.sync_probe if run.sync_check_every else None)
    if "reference" in state:
        run.reference.load_state_dict(state["reference"])
    run.cache.version = state["cache"]["version"]
    run.cache.entries = {k: (v[0].to(run.device), v[1]) for k, v in state["cache"]["entries"].items()}
    if run.optune_pool is not None:
        run.optune_pool.load_state_dict(state["optune_pool"])
    if run.monitor is not None:
        run.monitor.load_state_dict(state["monitor"])
    if run.alarm is not None and "alarm" in state:
        run.alarm.load_state_dict(state["alarm"])


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
