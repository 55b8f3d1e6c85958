"""A run's parts, typed, and how the config builds them: models, generator, objective, data, rewards."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..algos.objective import Objective
from ..algos.registry import build_objective
from ..algos.optune import PairPool
from ..config import Config
from ..data.encoding import PromptEncoder
from ..data.stream import PromptSource, PromptStream
from ..models import apply_lora, frozen_copy, load_causal_lm, load_tokenizer
from ..monitor.live import LiveMonitor
from ..rollout.hf import HFGenerator
from ..rollout.types import Generator, Rewarder, Rollouts
from .alarms import CollapseAlarm
from .optim import build_optimizer, pick_device, seed_everything


@dataclass
class RolloutCache:
    """Samples and rewards of prompts already sampled by the generator's current weights, by row id:
    offline (sync_every=0) generates each prompt once, and a repeat within a sync window reuses them."""

    version: int = -1
    entries: dict[str, tuple[Rollouts, torch.Tensor]] = field(default_factory=dict)  # id → (n rollouts, rewards [n])

    def for_version(self, version: int) -> "RolloutCache":
        if version != self.version:
            self.entries.clear()
            self.version = version
        return self


@dataclass
class Run:
    cfg: Config
    device: torch.device
    tokenizer: object  # a transformers tokenizer (left padding, pad token set)
    policy: torch.nn.Module  # fp32 master weights: what the optimizer steps and checkpoints save
    train_policy: torch.nn.Module  # what training forwards call: the policy, or it under bf16 autocast
    reference: torch.nn.Module | None
    generator: Generator
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: PromptSource
    train_rows: list[dict]
    eval_rows: list[dict]
    rewarder: Rewarder
    prompts: PromptEncoder
    sample_rng: torch.Generator  # the generator's sampling
    pair_rng: torch.Generator  # DPO's random pair choices
    out_dir: Path
    step: int = 0
    cache: RolloutCache = field(default_factory=RolloutCache)
    optune_pool: PairPool | None = None  # OPTune's stored pairs (algo.optune)
    monitor: LiveMonitor | None = None  # grokking monitors (monitor.pathways)
    eval_generator: HFGenerator | None = None  # samples from the policy's own weights (no copy)
    alarm: CollapseAlarm | None = None  # entropy / length / reward collapse detectors (train.alarms)

    @property
    def binary_tasks(self) -> set[str]:
        return {name for name, t in self.cfg.rewards.tasks.items() if t.is_binary}


def build_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows: a file/dataset, or a built-in task's disjoint splits."""
    from ..data.tasks import rows_from

    d = cfg.data
    task = {"default_task": d.default_task or "default"}
    train = rows_from(d.train, d.num_train, cfg.train.seed, "train", **task)
    held = rows_from(d.train, d.num_eval, cfg.train.seed, "test") if d.train.startswith("builtin:") else []
    if d.eval:
        held = rows_from(d.eval, d.num_eval, cfg.train.seed, "test", **task)
    held = [dict(r, id=f"eval:{i}") for i, r in enumerate(held)]  # train ids are stream indices
    unknown = sorted({r["task"] for r in train + held} - set(cfg.rewards.tasks))
    if unknown:
        raise ValueError(f"data rows use task(s) {unknown} that have no reward; add them under rewards.tasks "
                         f"(known: {sorted(cfg.rewards.tasks)})")
    return train, held


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


def needs_reference(cfg: Config, objective: Objective) -> bool:
    grpovi = getattr(cfg.algo, "grpovi", None)
    return objective.needs_reference or (grpovi is not None and grpovi.probs == "reference")


def build_run(cfg: Config) -> Run:
    from ..rewards.registry import build_rewarder

    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    train_rows, eval_rows = build_rows(cfg)
    rewarder = build_rewarder(cfg.rewards, cfg.data.default_task, device)
    m = cfg.model
    tokenizer = load_tokenizer(m.path, m.trust_remote_code, m.gguf_file)
    policy = load_causal_lm(m.path, m.dtype, m.trust_remote_code, m.gguf_file, device)
    objective = build_objective(cfg.algo)
    reference = None
    if needs_reference(cfg, objective):
        if cfg.reference.path:
            reference = load_causal_lm(cfg.reference.path, m.dtype, m.trust_remote_code, device=device)
            reference.requires_grad_(False).eval()
        else:
            reference = frozen_copy(policy)
    if m.lora:
        policy = apply_lora(policy, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
        if reference is not None and cfg.reference.sync == "with_generator":
            # A sync copies the policy's state, base plus adapter, into the reference, so the reference
            # needs the same adapter modules: a copy of the adapted policy, or (own path) its own model
            # wrapped alike, whose zero-initialised B leaves it computing its base weights until the
            # first sync. The RNG is forked so the wrapping adds no draw to the run's stream.
            if cfg.reference.path:
                with torch.random.fork_rng(devices=[]):
                    reference = apply_lora(reference, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
                reference.requires_grad_(False).eval()
            else:
                reference = frozen_copy(policy)
    policy.train()
    generator = HFGenerator(policy, tokenizer, batch_size=cfg.rollout.batch_size, fast_decode=cfg.rollout.fast_decode)
    train_policy = policy
    if cfg.train.mixed_precision == "bf16":
        # fp32 master weights stay in `policy` (optimizer, checkpoints, saves); sampling and the
        # reference run on bf16 copies (copy_weights_ casts at each sync); training forwards autocast.
        generator.model.to(torch.bfloat16)
        if reference is not None:
            reference.to(torch.bfloat16)
        train_policy = Autocast(policy, device.type, torch.bfloat16)
    optimizer, scheduler = build_optimizer(list(policy.parameters()), cfg.optim, cfg.train.steps, fused=True)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = None
    if cfg.data.efficacy is not None:  # DELT, scored with the run's own seed policy and rewards
        from ..data.delt import efficacy_order, pass_rate
        order = efficacy_order(cfg.data.efficacy, train_rows, cfg.train.seed, out, policy, tokenizer,
                               pass_rates=lambda: pass_rate(generator, rewarder, tokenizer, train_rows, cfg.rollout,
                                                            cfg.train.seed, device))
    return Run(
        cfg=cfg, device=device, tokenizer=tokenizer, policy=policy, train_policy=train_policy, reference=reference,
        generator=generator, objective=objective, optimizer=optimizer, scheduler=scheduler,
        stream=PromptStream(train_rows, cfg.data.prompts_per_step, seed=cfg.train.seed, order=order),
        train_rows=train_rows, eval_rows=eval_rows, rewarder=rewarder, prompts=PromptEncoder(tokenizer),
        sample_rng=torch.Generator(device=device).manual_seed(cfg.train.seed),
        pair_rng=torch.Generator().manual_seed(cfg.train.seed + 1), out_dir=out,
        optune_pool=PairPool() if getattr(cfg.algo, "optune", None) is not None else None,
        monitor=LiveMonitor(cfg.monitor.pathways, tokenizer, train_rows) if cfg.monitor.pathways else None,
        alarm=CollapseAlarm(cfg.train.alarms, cfg.rollout.max_new_tokens),
    )
