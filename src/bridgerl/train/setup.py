"""Build every part of a run from the config: models, generator, data, rewards, optimizer."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config, DPOConfig, GRPOConfig, TaskRewardConfig
from ..models import apply_lora, frozen_copy, load_causal_lm, load_tokenizer
from ..rollout.engines import build_generator
from ..rollout.hf import HFGenerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def build_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows: a file/dataset, or a built-in task's disjoint splits."""
    from ..data.formats import load_rows
    from ..data.tasks import builtin_rows

    d = cfg.data
    if d.train.startswith("builtin:"):
        spec = d.train.removeprefix("builtin:")
        train = builtin_rows(spec, d.num_train, cfg.train.seed, "train")
        held = builtin_rows(spec, d.num_eval, cfg.train.seed, "test")
    else:
        train = load_rows(d.train, default_task=d.default_task or "default")
        held = []
    if d.eval:
        if d.eval.startswith("builtin:"):
            held = builtin_rows(d.eval.removeprefix("builtin:"), d.num_eval, cfg.train.seed, "test")
        else:
            held = load_rows(d.eval, default_task=d.default_task or "default")
    held = [dict(r, id=f"eval:{i}") for i, r in enumerate(held)]  # train ids are stream indices
    unknown = sorted({r["task"] for r in train + held} - set(cfg.rewards.tasks))
    if unknown:
        raise ValueError(f"data rows use task(s) {unknown} that have no reward; add them under rewards.tasks "
                         f"(known: {sorted(cfg.rewards.tasks)})")
    return train, held


def build_reward_fn(task: TaskRewardConfig, device: torch.device):
    from ..rewards.math import math_reward
    from ..rewards.model import RewardModelScorer
    from ..rewards.python_fn import load_callable

    if task.kind == "math":
        return math_reward
    if task.kind == "partial":
        from ..rewards.partial import partial_credit_reward
        return partial_credit_reward
    if task.kind == "python":
        return load_callable(task.function)
    if task.kind == "model":
        return RewardModelScorer(task.path, device=device)
    from ..rewards.python_fn import reasoning_gym_reward
    return reasoning_gym_reward


def build_rewarder(cfg: Config, device: torch.device):
    from ..rewards.router import RewardRouter

    fns = {name: build_reward_fn(t, device) for name, t in cfg.rewards.tasks.items()}
    return RewardRouter(fns, failure_score=cfg.rewards.failure_score, timeout_s=cfg.rewards.timeout_s,
                        default_task=cfg.data.default_task)


def lr_lambda_for(o, total: int):
    """Warm-up, then constant, linear or cosine decay over `total` steps."""

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if o.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


@dataclass
class Run:
    cfg: Config
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    generator: HFGenerator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: object
    train_rows: list[dict]
    eval_rows: list[dict]
    rewarder: object
    sample_rng: torch.Generator
    pair_rng: torch.Generator
    out_dir: Path
    step: int = 0
    cache: dict = field(default_factory=dict)  # row id → (Rollouts of its n samples, rewards [n])
    cache_version: int = -1
    prompt_tokens: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # method state with state_dict(): OPTune pool, monitors
    eval_generator: HFGenerator | None = None  # samples from the policy's own weights (no copy)
    train_policy: torch.nn.Module | None = None  # what training forwards call: the policy, or it under autocast

    def __post_init__(self):
        if self.train_policy is None:
            self.train_policy = self.policy

    @property
    def binary_tasks(self) -> set[str]:
        return {name for name, t in self.cfg.rewards.tasks.items() if t.is_binary}

    def encode_prompt(self, row: dict) -> list[int]:
        if row["id"] not in self.prompt_tokens:
            prompt = row["prompt"]
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            self.prompt_tokens[row["id"]] = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=False)
        return self.prompt_tokens[row["id"]]


class Autocast(torch.nn.Module):
    """Runs a model's forward under torch.autocast; everything else (attributes, parameters) is the
    model's own. Only the forward is wrapped, so backward runs outside autocast as recommended."""

    def __init__(self, model: torch.nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def needs_reference(cfg: Config) -> bool:
    if isinstance(cfg.algo, DPOConfig):
        return True
    assert isinstance(cfg.algo, GRPOConfig)
    return cfg.algo.beta > 0 or (cfg.algo.reward_shaping == "variance_increase" and cfg.algo.shaping_probs == "reference")


def build_run(cfg: Config) -> Run:
    from ..data.stream import PromptStream

    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    train_rows, eval_rows = build_rows(cfg)
    rewarder = build_rewarder(cfg, device)
    m = cfg.model
    tokenizer = load_tokenizer(m.path, m.trust_remote_code) if not m.gguf_file else _gguf_tokenizer(m)
    policy = load_causal_lm(m.path, m.dtype, m.trust_remote_code, m.gguf_file, device)
    reference = None
    if needs_reference(cfg):
        if cfg.reference.path:
            reference = load_causal_lm(cfg.reference.path, m.dtype, m.trust_remote_code, device=device)
            reference.requires_grad_(False).eval()
        else:
            reference = frozen_copy(policy)
    if m.lora:
        policy = apply_lora(policy, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
    policy.train()
    generator = build_generator(cfg.rollout, policy, tokenizer, m.path, model_dtype=m.dtype, seed=cfg.train.seed)
    train_policy = policy
    if cfg.train.mixed_precision == "bf16":
        # fp32 master weights stay in `policy` (optimizer, checkpoints, saves); sampling and the
        # reference run on bf16 copies (copy_weights_ casts at each sync); training forwards autocast.
        if cfg.rollout.engine == "hf":  # vLLM engines take their dtype from rollout.vllm.dtype
            generator.model.to(torch.bfloat16)
        if reference is not None:
            reference.to(torch.bfloat16)
        train_policy = Autocast(policy, device.type, torch.bfloat16)
    params = [p for p in policy.parameters() if p.requires_grad]
    o = cfg.optim
    # Fused AdamW: one kernel over all parameters instead of a Python loop of small ops.
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay,
                                  fused=all(p.is_floating_point() for p in params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(o, cfg.train.steps))
    stream = PromptStream(train_rows, cfg.data.prompts_per_step, seed=cfg.train.seed)
    sample_rng = torch.Generator(device=device).manual_seed(cfg.train.seed)
    pair_rng = torch.Generator().manual_seed(cfg.train.seed + 1)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, device, tokenizer, policy, reference, generator, optimizer, scheduler, stream, train_rows,
              eval_rows, rewarder, sample_rng, pair_rng, out, train_policy=train_policy)
    if cfg.data.efficacy is not None:  # scored with the run's own seed policy and rewards
        from ..data.efficacy_config import efficacy_order
        run.stream = PromptStream(train_rows, cfg.data.prompts_per_step, seed=cfg.train.seed, order=efficacy_order(run))
    if cfg.monitor.pathways is not None:
        from .monitoring import LiveMonitor
        run.extras["pathways"] = LiveMonitor(cfg.monitor.pathways, tokenizer, train_rows)
    if isinstance(cfg.algo, DPOConfig) and cfg.algo.exploration is not None:
        from ..algos.optune import PairPool
        run.extras["optune"] = PairPool()
    return run


def _gguf_tokenizer(m):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.path, gguf_file=m.gguf_file)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
