"""Which generator a run samples with, from `rollout`: the in-process HF engine, or a pool of Ray
workers (`rollout.workers: K`). With --nproc N only rank 0 samples; the other ranks get a follower
that tracks the weights version. Ray is imported only when workers are asked for."""
from __future__ import annotations

import torch

from .hf import HFGenerator
from .types import Generator


def build_generator(rollout_cfg, policy: torch.nn.Module, tokenizer, device: torch.device, rank: int = 0) -> Generator:
    if rank != 0:
        from ..distributed.fsdp import FollowerGenerator
        return FollowerGenerator()
    if rollout_cfg.workers > 0:
        from .workers import RayGeneratorPool
        # On GPU each worker would hold a vLLM engine (num_gpus=1); on CPU an HFGenerator with one thread.
        return RayGeneratorPool(policy, tokenizer, workers=rollout_cfg.workers, batch_size=rollout_cfg.batch_size,
                                fast_decode=rollout_cfg.fast_decode, device=device)
    return HFGenerator(policy, tokenizer, batch_size=rollout_cfg.batch_size, fast_decode=rollout_cfg.fast_decode)
