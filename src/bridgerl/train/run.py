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
from ..distributed.fsdp import rank_and_world, shard_model
from ..rollout.engines import build_generator
from ..rollout.hf import HFGenerator
from ..rollout.sync import probe_sequences
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
    sync_probe: list[list[int]] | None = None  # fixed token sequences that check each weight push (rollout/sync.py)
    sync_check: tuple[float, float] | None = None  # (timeout s, log-prob tolerance) of each push
    sync_check_every: int = 1  # probe every k-th push (0: never); rollout.sync_check_every resolved
    pushes: int = 0  # weight pushes so far in this process
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


def sync_tolerance(cfg: Config) -> float:
    """The probe's log-prob tolerance: rollout.sync_tolerance for an fp32 engine; a bf16/fp16 engine
    differs from the fp32 policy by ~1e-2 on the probe, so it is checked at ≥ 0.1 (a stale or wrong
    push is off by nats)."""
    low_precision = cfg.train.mixed_precision != "no" or cfg.model.dtype != "float32" or (
        cfg.rollout.engine != "hf" and cfg.rollout.vllm.dtype not in ("auto", "float32"))
    return max(cfg.rollout.sync_tolerance, 0.1) if low_precision else cfg.rollout.sync_tolerance


def sync_check_every(cfg: Config) -> int:
    """rollout.sync_check_every, or its default: every push to an engine across a process or precision
    boundary (vLLM, a server, Ray workers); every 10th for the in-process hf copy, an exact tensor copy."""
    if cfg.rollout.sync_check_every is not None:
        return cfg.rollout.sync_check_every
    return 1 if cfg.rollout.engine != "hf" or cfg.rollout.workers > 0 else 10


def needs_reference(cfg: Config, objective: Objective) -> bool:
    grpovi = getattr(cfg.algo, "grpovi", None)
    return objective.needs_reference or (grpovi is not None and grpovi.probs == "reference")


def _refuse_on_ranks(cfg: Config) -> None:
    """What --nproc N does not run yet, said before any model loads."""
    if cfg.model.lora:
        raise ValueError("--nproc > 1 with model.lora is not supported yet; train the adapter on one process")
    if cfg.monitor.pathways:
        raise ValueError("--nproc > 1 with monitor.pathways is not supported yet; run `bridgerl monitor RUN_DIR` "
                         "on the checkpoints afterwards")
    if cfg.data.efficacy is not None:
        raise ValueError("--nproc > 1 with data.efficacy is not supported yet; score once with `bridgerl score` and "
                         "use data.efficacy.scorer=file on one process")


def build_run(cfg: Config) -> Run:
    from ..rewards.registry import build_rewarder

    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    train_rows, eval_rows = build_rows(cfg)
    rank, world = rank_and_world()
    if world > 1:
        _refuse_on_ranks(cfg)
    if (cfg.rollout.workers or cfg.rewards.workers) and rank == 0:
        import os

        from ..distributed.actors import ensure_ray
        # A local Ray gets a CPU slot per actor even on a smaller machine: each actor runs one thread.
        ensure_ray(num_cpus=max(os.cpu_count() or 1, cfg.rollout.workers + cfg.rewards.workers))
    rewarder = build_rewarder(cfg.rewards, cfg.data.default_task, device)
    if cfg.rewards.workers and rank == 0:
        from functools import partial

        from ..rewards.workers import RayRewardPool
        rewarder = RayRewardPool(partial(build_rewarder, cfg.rewards, cfg.data.default_task, torch.device("cpu")),
                                 cfg.rewards.workers)
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
    generator = build_generator(cfg.rollout, policy, tokenizer, m.path, model_dtype=m.dtype, seed=cfg.train.seed,
                                device=device, rank=rank)
    if world > 1:  # after the generator's copy, before the optimizer sees the parameters
        shard_model(policy)
    train_policy = policy
    if cfg.train.mixed_precision == "bf16":
        # fp32 master weights stay in `policy` (optimizer, checkpoints, saves); sampling and the
        # reference run on bf16 copies (copy_weights_ casts at each sync); training forwards autocast.
        if isinstance(generator, HFGenerator):  # vLLM engines take their dtype from rollout.vllm.dtype
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
        sync_probe=probe_sequences(min(len(tokenizer), policy.config.vocab_size)),
        sync_check=(cfg.rollout.sync_timeout_s, sync_tolerance(cfg)), sync_check_every=sync_check_every(cfg),
    )
