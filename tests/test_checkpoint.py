"""Checkpoints hold data only (safetensors + JSON): exact round trips, a planted pickle refused,
and a full disk mid-save leaves the previous checkpoint intact."""
from __future__ import annotations

import errno
import math
import pickle
from pathlib import Path

import pytest
import torch

import bridgerl.train.checkpoint as ckpt
from bridgerl.rollout.types import Rollouts
from bridgerl.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint)


def same(a, b, path="") -> None:
    """Equal in value and in type, all the way down (a tuple is not a list, int keys stay ints)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def rollouts(n=2, t=3) -> Rollouts:
    return Rollouts(prompt_ids=torch.arange(2 * n).view(n, 2), prompt_mask=torch.ones(n, 2, dtype=torch.long),
                    completion_ids=torch.arange(n * t).view(n, t), completion_mask=torch.ones(n, t, dtype=torch.long),
                    gen_logprobs=torch.randn(n, t), gen_entropy=torch.rand(n, t), versions=torch.tensor([3, 3]),
                    completions=["a", "b\u00e9"], n=n, sampled=False)


def test_nested_state_round_trips_exactly(tmp_path):
    shared = torch.randn(4, 3)
    state = {
        "step": 7, "lr": 1e-3, "nan": math.nan, "inf": -math.inf, "none": None, "flag": True, "name": "x",
        "rng": torch.get_rng_state(), "bf16": torch.randn(3, dtype=torch.bfloat16), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5), "bools": torch.tensor([True, False]),
        "tied": {"embed": shared, "head": shared}, "view": shared[1:, :2],
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}, 1: {}}, "param_groups": [{"betas": (0.9, 0.999),
                                                                                          "params": [0, 1]}]},
        "cache": {"entries": {5: (rollouts(), torch.tensor([1.0, 0.0])), "eval:1": (rollouts(), torch.zeros(2))}},
        "odd_keys": {"$tensor": 1, "plain": [1, (2, 3), []]},
    }
    save_checkpoint(tmp_path, 7, state)
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    same(state, loaded)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "checkpoints").rglob("*"))


def test_a_real_run_state_round_trips(tmp_path, tiny_model_dir):
    from bridgerl.config import load_config
    from bridgerl.train.checkpoint import load_run_state as load_state, run_state as state_dict
    from bridgerl.train.loop import train_step
    from bridgerl.train.run import build_run

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "data.num_train=8", "data.prompts_per_step=2",
                             "rollout.n=2", "rollout.max_new_tokens=4", "rollout.sync_every=0", "train.micro_batch=4",
                             "log.tensorboard=false", "log.progress=false", f"train.out_dir={tmp_path / 'r'}",
                             "rewards.processes=0"])
    run = build_run(cfg)
    train_step(run)
    state = state_dict(run)
    save_checkpoint(run.out_dir, run.step, state)
    loaded = load_checkpoint(latest_checkpoint(run.out_dir))
    same(state, loaded)
    load_state(run, loaded)  # and the loop accepts it


class _Payload:
    """Unpickling this writes a file: what a hostile checkpoint could do instead."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    folder = tmp_path / "checkpoints" / "step-0000001"
    folder.mkdir(parents=True)
    with open(folder / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": _Payload(str(target))}, f)
    (tmp_path / "checkpoints" / "latest").write_text(folder.name)
    proof = tmp_path / "proof.txt"  # the payload is live: plain unpickling writes its file
    pickle.loads(pickle.dumps(_Payload(str(proof))))
    assert proof.read_text() == "pwned"
    assert latest_checkpoint(tmp_path) == folder
    with pytest.raises(CheckpointError, match="refusing to load .*can run code"):
        load_checkpoint(folder)
    assert not target.exists()


def test_json_cannot_name_an_arbitrary_class(tmp_path):
    save_checkpoint(tmp_path, 1, {"a": 1})
    folder = latest_checkpoint(tmp_path)
    (folder / "state.json").write_text('{"format": 1, "state": {"$dataclass": "Popen", "fields": {"args": "ls"}}}')
    with pytest.raises(CheckpointError, match="'Popen', which this version does not know"):
        load_checkpoint(folder)


def test_unsupported_values_are_refused_at_save_with_their_key(tmp_path):
    with pytest.raises(CheckpointError, match="at 'extras.pool'"):
        save_checkpoint(tmp_path, 1, {"extras": {"pool": object()}})
    assert latest_checkpoint(tmp_path) is None and not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_full_disk_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first = {"step": 1, "w": torch.randn(64, 64)}
    save_checkpoint(tmp_path, 1, first)
    real_write = ckpt._write

    def full_disk(path, data):
        if ".tmp-step-0000002" in str(path):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # half of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write", full_disk)
    with pytest.raises(CheckpointError, match="disk .* is full. The previous checkpoint step-0000001 is intact"):
        save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.randn(64, 64)})
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    same(first, load_checkpoint(latest_checkpoint(tmp_path)))
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    monkeypatch.setattr(ckpt, "_write", real_write)
    save_checkpoint(tmp_path, 2, {"step": 2})  # space back: the next save works
    assert latest_checkpoint(tmp_path).name == "step-0000002"
