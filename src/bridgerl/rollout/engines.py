"""rollout.engine / rollout.workers → a Generator: the in-process HF engine, vLLM in process or as a
server, or a pool of Ray workers. With --nproc N only rank 0 samples; the other ranks get a follower
that tracks the weights version. Each engine's module (vLLM, Ray) is imported only when chosen."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .types import Generator


def vllm_model_folder(policy: torch.nn.Module, tokenizer, model_path: str | None) -> str:
    """A folder vLLM can load: the model's own when it is an ordinary HF folder, else (a hub id, a GGUF
    file, a LoRA-wrapped policy with no folder) the policy saved once to a temporary folder."""
    if model_path and (Path(model_path) / "config.json").exists():
        return str(model_path)
    from .vllm import export_state

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    out = Path(tempfile.mkdtemp(prefix="bridgerl-vllm-model-"))
    base.config.save_pretrained(out)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(out)
    from .vllm import state_to_bytes

    (out / "model.safetensors").write_bytes(state_to_bytes(export_state(policy)))
    tokenizer.save_pretrained(out)
    return str(out)


def build_generator(rollout_cfg, policy: torch.nn.Module, tokenizer, model_path: str | None,
                    model_dtype: str = "float32", seed: int = 0, device: torch.device | None = None,
                    rank: int = 0) -> Generator:
    engine = rollout_cfg.engine
    if rank != 0:
        from ..distributed.fsdp import FollowerGenerator
        return FollowerGenerator()
    if rollout_cfg.workers > 0:
        if engine != "hf":
            raise ValueError("rollout.workers places HF engines on Ray actors; vLLM inside the actors is not built "
                             "yet: use rollout.engine=hf with workers, or vllm without workers")
        from .workers import RayGeneratorPool
        return RayGeneratorPool(policy, tokenizer, workers=rollout_cfg.workers, batch_size=rollout_cfg.batch_size,
                                fast_decode=rollout_cfg.fast_decode, device=device)
    if engine == "hf":
        from .hf import HFGenerator

        return HFGenerator(policy, tokenizer, batch_size=rollout_cfg.batch_size, fast_decode=rollout_cfg.fast_decode)
    if engine == "vllm":
        from .vllm import VLLMGenerator

        opts = rollout_cfg.vllm
        dtype = model_dtype if opts.dtype == "auto" else opts.dtype
        return VLLMGenerator(vllm_model_folder(policy, tokenizer, model_path), tokenizer, opts, dtype=dtype, seed=seed)
    if engine == "vllm_server":
        from .vllm_server import VLLMServerGenerator

        srv = rollout_cfg.server
        folder = model_path if model_path and (Path(model_path) / "config.json").exists() else None
        return VLLMServerGenerator(srv.url, tokenizer, request_timeout_s=srv.request_timeout_s,
                                   weights_dir=srv.weights_dir, model_path=folder)
    raise ValueError(f"unknown rollout.engine {engine!r}; choose hf, vllm or vllm_server")
