"""A pool of K Ray generator actors behind the Generator protocol (rollout/types.py).

Each batch's prompts are split into K contiguous shares (a prompt's n samples stay on one actor, so
groups are whole), and every prompt samples from its own seed (hf.prompt_seeds, drawn from the
step's rng exactly as the in-process engine with per_prompt_seeds does): for the same rng and
weights the pool returns the same rollouts as one HFGenerator. Weights travel once per push through
the object store (`ray.put` of the state dict; every actor reads the same object). An actor that
dies is replaced, given the last pushed weights and its share re-run (distributed/actors.py);
`restarts` counts replacements (logged as `workers/restarts`).

On CPU each actor holds an HFGenerator with one torch thread. On GPU this is where a vLLM engine
per actor goes (num_gpus=1 each, weights over NCCL or vLLM's own transfer instead of the object
store); the sharing, seeding and restart logic stay the same."""
from __future__ import annotations

import time

import torch

from .hf import HFGenerator, prompt_seeds
from .types import Rollouts, concat_rollouts


class GeneratorWorker:
    """One actor: an HFGenerator on its own copy of the model (CPU, one thread)."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int, fast_decode: bool, threads: int = 1):
        torch.set_num_threads(threads)  # K workers on a shared machine: one core each, not K × all
        model.requires_grad_(False).eval()
        if torch.cuda.is_available():  # Ray gave this actor its own GPU (CUDA_VISIBLE_DEVICES)
            model.to("cuda")
        self.engine = HFGenerator(model, tokenizer, batch_size=batch_size, share_weights=True,
                                  fast_decode=fast_decode, per_prompt_seeds=True)

    def load(self, state: dict, version: int) -> int:
        own = self.engine.model.state_dict()
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)  # to the engine's device and dtype
        self.engine.version = version
        return version

    def generate(self, prompts: list[list[int]], n: int, sampling: dict, seeds: list[int] | None) -> Rollouts:
        return self.engine.generate(prompts, n, _Sampling(**sampling), None, seeds=seeds).to("cpu")

    def score_tokens(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return [t.cpu() for t in self.engine.score_tokens(sequences)]

    def pid(self) -> int:
        import os

        return os.getpid()


class _Sampling:
    def __init__(self, temperature: float, top_p: float, top_k: int, max_new_tokens: int):
        self.temperature, self.top_p, self.top_k, self.max_new_tokens = temperature, top_p, top_k, max_new_tokens


def _state_of(policy) -> dict[str, torch.Tensor]:
    """CPU copies of a module's (or a gathered full state's) parameters and buffers."""
    state = policy if isinstance(policy, dict) else policy.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class RayGeneratorPool:
    """K generator actors; implements the Generator protocol. `startup` holds the measured seconds of
    Ray init and actor creation; `last_push_s` the last weight push."""

    def __init__(self, model: torch.nn.Module, tokenizer, workers: int, batch_size: int = 256,
                 fast_decode: bool = True, device: torch.device | str = "cpu", num_cpus: int | None = None,
                 timeout_s: float | None = None, gpus_per_worker: float | None = None):
        import ray

        from ..distributed.actors import ActorGroup, ensure_ray

        from ..models import frozen_copy

        self._ray = ray
        self.device = torch.device(device)
        self.pad_id = tokenizer.pad_token_id
        self.version = 0
        init_s = ensure_ray(num_cpus)
        start = time.perf_counter()
        seed_model = frozen_copy(model).to("cpu").float()
        # The seed model travels once; a replacement actor starts from it and is then sent the last push.
        self._model_ref = ray.put(seed_model)
        self._weights_ref = None
        if gpus_per_worker is None:  # a GPU each when the trainer sees GPUs (a Ray cluster places them)
            gpus_per_worker = 1 if torch.cuda.is_available() else 0
        self.group = ActorGroup(GeneratorWorker, workers, (self._model_ref, tokenizer, batch_size, fast_decode),
                                restore=self._restore, timeout_s=timeout_s, num_gpus=gpus_per_worker)
        self.startup = {"ray_init_s": init_s, "actors_s": time.perf_counter() - start}
        self.last_push_s = 0.0

    @property
    def restarts(self) -> int:
        return self.group.restarts

    def _restore(self, actor):
        if self._weights_ref is None:
            return actor.__ray_ready__.remote()
        return actor.load.remote(self._weights_ref, self.version)

    def load_weights(self, policy, version: int) -> None:
        """`policy`: a module, or a full state dict (rank 0's gather under FSDP, distributed/fsdp.py)."""
        start = time.perf_counter()
        self._weights_ref = self._ray.put(_state_of(policy))
        self.version = version
        self.group.broadcast("load", self._weights_ref, version)
        self.last_push_s = time.perf_counter() - start

    def generate(self, prompts: list[list[int]], n: int, sampling, rng: torch.Generator | None = None) -> Rollouts:
        from ..distributed.actors import split_even

        seeds = prompt_seeds(rng, len(prompts)) if sampling.temperature > 0 else None
        params = {k: getattr(sampling, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")}
        bounds = split_even(len(prompts), len(self.group))
        shares = [(prompts[a:b], n, params, None if seeds is None else seeds[a:b]) for a, b in bounds]
        parts = self.group.map("generate", shares)
        return concat_rollouts(parts, self.pad_id).to(self.device)

    def score_tokens(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return self.group.map("score_tokens", [(sequences,)])[0]

    def metrics(self) -> dict[str, float]:
        return {"workers/restarts": float(self.restarts), "workers/push_s": self.last_push_s}

    def state_dict(self) -> dict:
        if self._weights_ref is None:
            return {"version": self.version}
        return {"version": self.version, "weights": self._ray.get(self._weights_ref)}

    def load_state_dict(self, state: dict) -> None:
        if "weights" in state:
            self.load_weights(state["weights"], state["version"])
        self.version = state["version"]

    def close(self) -> None:
        self.group.close()
