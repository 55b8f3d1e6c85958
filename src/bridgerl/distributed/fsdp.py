"""Process groups and FSDP2 for the trainer ranks started by torchrun (launch.py).

Every rank holds the whole batch (rank 0 samples and scores it, then broadcasts), so every rank
builds the same micro-batch list; micro-batch i trains on rank i mod N. Each rank's loss carries the
batch-wide normalizers, and gradients are *summed* across ranks (not averaged), so the update is
the single-process update on the same rollouts. FSDP2 runs collectives in every forward and
backward: ranks must run the same number of passes, so a rank with fewer micro-batches runs a
zero-weighted pass instead (`rank_share` pads with None)."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_distributed(timeout_s: float = 1800) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPU, gloo on
    CPU; a plain run returns (0, 1) and starts nothing."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def shutdown() -> None:
    """Leave the process group; the barrier first, or a rank still writing a checkpoint crashes at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the largest ModuleList of the model, e.g. `model.layers`)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of decoder blocks to shard; "
                         "FSDP2 here shards per block (model.layers)")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard each decoder block, then the root (embeddings, norm, head); gradients summed across ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not mean: each rank's loss is already its share of the batch-wide loss. Plain SUM
            # also works on gloo, which has no AVG or PREMUL_SUM.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


@torch.no_grad()
def full_state_dict(model: torch.nn.Module, on_tensor: Callable[[str, torch.Tensor], None] | None = None,
                    dst: int | None = 0) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) parameters and buffers, on CPU, at rank `dst` (None elsewhere; dst=None:
    on every rank, e.g. for a replicated reference model).

    Every rank must call this and walk the tensors in the same order: `full_tensor()` is an all-gather,
    and a rank that skips or reorders one hangs its peers. `on_tensor(name, tensor)` streams each
    tensor at `dst` (e.g. to an inference engine) instead of keeping the dict; it then returns {}."""
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if is_distributed() else 0
    keep = dst is None or rank == dst
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            if on_tensor is not None:
                on_tensor(name, full)
            else:
                out[name] = full.detach().to("cpu", copy=True)
    return out if keep else None


class FullState:
    """A gathered state dict where a module is expected (`copy_weights_` reads `.state_dict()`)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class FollowerGenerator:
    """The generator as ranks > 0 see it: rank 0 samples and broadcasts, the others only track the
    weights version so that staleness, the rollout cache and the reference agree on every rank."""

    def __init__(self):
        self.version = 0

    def load_weights(self, policy, version: int) -> None:
        self.version = version

    def generate(self, *args, **kwargs):
        raise RuntimeError("only rank 0 samples; other ranks receive the batch (distributed/fsdp.broadcast_object)")

    def score_tokens(self, sequences):
        raise RuntimeError("only rank 0 holds the generator")

    def state_dict(self) -> dict:
        return {"version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.version = state["version"]

    def close(self) -> None:
        pass


def push_weights(generator, policy: torch.nn.Module, version: int, reference: torch.nn.Module | None = None,
                 check: tuple[float, float] | None = None, probe: list[list[int]] | None = None) -> dict:
    """Weight sync on any number of ranks: every rank joins the gather, rank 0's generator loads the
    full state; `reference` (replicated on every rank) takes it too when given. In one process, with
    `check` = (timeout s, log-prob tolerance), the push is the one of rollout/sync.py: a deadline, and with a
    `probe` the engine's log-probs on fixed tokens checked against the policy's."""
    metrics: dict = {}
    if not is_distributed():
        if check is not None:
            from ..rollout.sync import push_weights as verified_push
            metrics = verified_push(generator, policy, version, check[0], probe, check[1])
        else:
            generator.load_weights(policy, version)
        if reference is not None:
            reference.load_state_dict(policy.state_dict())
        return metrics
    full = full_state_dict(policy, dst=None if reference is not None else 0)
    generator.load_weights(FullState(full) if full is not None else policy, version)
    if reference is not None:
        reference.load_state_dict(full)
    return metrics


def is_main() -> bool:
    return rank_and_world()[0] == 0


def zero_pass(objective, policy: torch.nn.Module, micro) -> None:
    """A micro-batch's forward and backward with its loss times zero: adds nothing to any gradient but
    runs FSDP's all-gathers and reduce-scatters, for a rank with fewer micro-batches than its peers."""
    loss, _ = objective.loss(policy, micro)
    (loss * 0.0).backward()


def rank_share(items: list[T], rank: int, world: int) -> list[T | None]:
    """Items i with i mod world == rank, padded with None to the same length on every rank."""
    mine: list[T | None] = list(items[rank::world])
    per_rank = -(-len(items) // world) if items else 1
    return mine + [None] * (per_rank - len(mine))


def all_reduce_sum(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled: rollouts, rewards, metrics)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
