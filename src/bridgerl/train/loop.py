"""The training loop: one step, read top to bottom, is the whole program (design.md)."""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch

from ..config import Config, DPOConfig, GRPOConfig, dump_config
from ..rollout.types import Rollouts, concat_rollouts
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import evaluate
from .exploration import optune_rollouts
from .logger import MetricsLogger
from .setup import Run, build_run
from .shaping import shape_rewards
from .updates import dpo_update, grpo_update, reference_logprobs, spread_rows


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def sync_due(step: int, sync_every: int) -> bool:
    """θ_gen ← θ at steps t with t mod s == 0; s = 0 never syncs (offline)."""
    return sync_every > 0 and step % sync_every == 0


def train_step(run: Run) -> dict:
    cfg, timer = run.cfg, Timer()
    rows = run.stream.next_batch()
    with timer("sync"):
        if sync_due(run.step, cfg.rollout.sync_every) and run.generator.version != run.step:
            run.generator.load_weights(run.policy, run.step)
            if cfg.reference.sync == "with_generator":
                run.reference.load_state_dict(run.policy.state_dict())
    pairs = weights = None
    with timer("generation"):
        if "optune" in run.extras:
            batch, rewards, fresh, pairs, weights = optune_rollouts(run, rows, timer)
        else:
            batch, rewards, fresh = rollouts_for(run, rows, timer)
            rewards = rewards.view(len(rows), cfg.rollout.n)
    with timer("reference"):
        ref_logps = reference_for(run, batch, rewards)
    with timer("shaping"):
        rewards, shaping_metrics = shape_rewards(run, rows, rewards, ref_logps)
    with timer("update"):
        step_fn = lambda: optimizer_step(run)  # noqa: E731
        if isinstance(cfg.algo, DPOConfig):
            binary = torch.tensor([r["task"] in run.binary_tasks for r in rows])
            update = dpo_update(run.train_policy, run.reference, batch, rewards, binary, cfg.algo,
                                cfg.train.micro_batch, step_fn, run.pair_rng, pairs, weights, ref_logps)
        else:
            update = grpo_update(run.train_policy, run.reference, batch, rewards, cfg.algo, cfg.train.micro_batch,
                                 run.step, step_fn, ref_logps)
    run.step += 1
    metrics = rollout_metrics(run, rows, batch, rewards, fresh) | shaping_metrics | update | timing(timer)
    if metrics.get("tokens/generated") and timer.seconds.get("generate"):
        metrics["tokens/s"] = metrics["tokens/generated"] / timer.seconds["generate"]
    return metrics


def rollouts_for(run: Run, rows: list[dict], timer: Timer) -> tuple[Rollouts, torch.Tensor, dict]:
    """Samples and rewards for the batch's prompts; prompts already sampled by these same weights
    (offline, or a repeat within a sync window) reuse their cached samples instead of regenerating."""
    cfg = run.cfg
    if run.cache_version != run.generator.version:
        run.cache.clear()
        run.cache_version = run.generator.version
    missing = [r for r in rows if r["id"] not in run.cache]
    fresh = {"tokens/generated": 0.0, "reward/failures": 0.0}
    if missing:
        n = cfg.rollout.n
        with timer("generate"):
            new = run.generator.generate([run.encode_prompt(r) for r in missing], n, cfg.rollout, run.sample_rng)
        expanded = [r for r in missing for _ in range(n)]
        with timer("reward"):
            scores, reward_metrics = run.rewarder([r["prompt"] for r in expanded], new.completions, expanded)
        fresh = {"tokens/generated": float(new.completion_mask.sum().item())} | reward_metrics
        for i, r in enumerate(missing):
            run.cache[r["id"]] = (new.select(torch.arange(i * n, (i + 1) * n)), scores[i * n:(i + 1) * n])
    parts = [run.cache[r["id"]] for r in rows]
    batch = concat_rollouts([p[0] for p in parts], run.tokenizer.pad_token_id)
    return batch, torch.cat([p[1] for p in parts]).float(), fresh


def reference_for(run: Run, batch: Rollouts, rewards: torch.Tensor) -> torch.Tensor | None:
    """The reference's token log-probs [B, T], once per batch, or None when the update computes its own.

    When the reference holds the very weights that sampled every row, they are the sampler's own
    log-probs (recorded at temperature 1) and no forward runs. Otherwise GRPO computes them here for
    the groups that train, so GRPOVI's p and the KL term share one forward; DPO computes only its
    pairs' rows, inside the update."""
    if run.reference is None:
        return None
    version = reference_weights_version(run)
    if batch.sampled and version is not None and bool((batch.versions == version).all()):
        return batch.gen_logprobs
    if isinstance(run.cfg.algo, GRPOConfig):
        return reference_logprobs(run.reference, batch, spread_rows(rewards), run.cfg.train.micro_batch, rewards.shape[1])
    return None


def reference_weights_version(run: Run) -> int | None:
    """Which generator version's weights the reference holds, if any: the initial policy (version
    0) unless loaded from its own path; the generator's current weights when synced with it."""
    ref = run.cfg.reference
    if ref.sync == "with_generator" and (ref.path is None or run.generator.version > 0):
        return run.generator.version
    if ref.sync == "never" and ref.path is None:
        return 0
    return None


def optimizer_step(run: Run) -> dict:
    grads = [p.grad for p in run.policy.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in run.policy.parameters() if p.grad is not None],
        run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else float("inf"))
    if not grads or not torch.isfinite(norm):
        run.optimizer.zero_grad(set_to_none=True)
        print(f"[bridgerl] step {run.step}: non-finite gradient norm; the update was skipped")
        return {"grad_norm": float("nan"), "update/skipped": 1.0}
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm.item(), "lr": run.scheduler.get_last_lr()[0]}


def rollout_metrics(run: Run, rows: list[dict], batch: Rollouts, rewards: torch.Tensor, fresh: dict) -> dict:
    mask = batch.completion_mask.float()
    stale = (run.step - 1 - batch.versions).float()  # run.step already counts this update
    m = {
        "reward/mean": rewards.float().mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward/group_std": rewards.std(dim=1).mean().item(),
        "completion_length": mask.sum(dim=1).mean().item(),
        "entropy": ((batch.gen_entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
        "staleness/mean": stale.mean().item(),
        "staleness/max": stale.max().item(),
        "generator/version": float(run.generator.version),
    }
    if "optune" in run.extras:  # the batch is stored pairs: sampler statistics come from `fresh`
        m.pop("entropy"), m.pop("completion_length")
    tasks = sorted({r["task"] for r in rows})
    if len(tasks) > 1:
        for t in tasks:
            sel = torch.tensor([r["task"] == t for r in rows])
            m[f"reward/{t}/mean"] = rewards[sel].mean().item()
    return m | fresh


def timing(timer: Timer) -> dict:
    total = sum(v for k, v in timer.seconds.items() if k not in ("generate", "reward"))
    out = {f"time/{k}": v for k, v in timer.seconds.items()}
    return out | {"time/step": total}


def state_dict(run: Run) -> dict:
    state = {
        "step": run.step,
        "policy": {k: v.detach().cpu() for k, v in run.policy.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "stream": run.stream.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "sample": run.sample_rng.get_state(), "pair": run.pair_rng.get_state()},
        "cache": {"version": run.cache_version,
                  "entries": {k: (v[0].to("cpu"), v[1].cpu()) for k, v in run.cache.items()}},
        "extras": {k: v.state_dict() for k, v in run.extras.items()},
        "config": run.cfg.model_dump(mode="json"),
    }
    if run.generator.version != run.step or run.cfg.rollout.sync_every == 0:
        state["generator"] = run.generator.state_dict()
    else:
        state["generator"] = {"version": run.generator.version}  # equal to the policy: no second copy
    if run.reference is not None and run.cfg.reference.sync == "with_generator":
        state["reference"] = {k: v.cpu() for k, v in run.reference.state_dict().items()}
    return state


def load_state(run: Run, state: dict) -> None:
    run.step = state["step"]
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
        run.generator.load_weights(run.policy, state["generator"]["version"])
    if "reference" in state:
        run.reference.load_state_dict(state["reference"])
    run.cache_version = state["cache"]["version"]
    run.cache = {k: (v[0].to(run.device), v[1]) for k, v in state["cache"]["entries"].items()}
    for k, v in state["extras"].items():
        run.extras[k].load_state_dict(v)


def train(cfg: Config, resume: bool = False, run: Run | None = None) -> Run:
    run = run or build_run(cfg)
    logger = MetricsLogger(run.out_dir, cfg.log, resume=resume)
    dump_config(cfg, run.out_dir / "config.yaml")
    if resume:
        ckpt = latest_checkpoint(run.out_dir)
        if ckpt is None:
            print(f"[bridgerl] --resume: no checkpoint in {run.out_dir}/checkpoints; starting from step 0")
        else:
            load_state(run, load_checkpoint(ckpt))
            print(f"[bridgerl] resumed from {ckpt} at step {run.step}")
    eval_every = cfg.eval.every
    monitor = run.extras.get("pathways")
    if run.step == 0:
        start = (evaluate(run) if cfg.eval.at_start and run.eval_rows else {}) | \
            (monitor.maybe_measure(run.policy, 0) if monitor else {})
        if start:
            logger.log(0, start)
    progress = logger.progress(cfg.train.steps, initial=run.step)
    while run.step < cfg.train.steps:
        metrics = train_step(run)
        if monitor:
            metrics |= monitor.maybe_measure(run.policy, run.step)
        if eval_every and run.step % eval_every == 0 and run.eval_rows and run.step < cfg.train.steps:
            metrics |= evaluate(run)
        logger.log(run.step, metrics)
        progress.update(metrics)
        every = cfg.train.checkpoint_every
        if every and run.step % every == 0 and run.step < cfg.train.steps:
            save_checkpoint(run.out_dir, run.step, state_dict(run), cfg.train.keep_checkpoints)
    progress.close()
    if run.eval_rows:
        logger.log(run.step, evaluate(run), final=True)
    save_checkpoint(run.out_dir, run.step, state_dict(run), cfg.train.keep_checkpoints)
    if cfg.train.save_final:
        final = run.out_dir / "final"
        run.policy.save_pretrained(final)
        run.tokenizer.save_pretrained(final)
        if cfg.model.lora and cfg.model.lora.save_merged:
            merged = copy.deepcopy(run.policy).merge_and_unload()  # the run's policy keeps its adapter
            merged.save_pretrained(final / "merged")
            run.tokenizer.save_pretrained(final / "merged")
    logger.close()
    return run
