"""The training loop: one step, read top to bottom, is the whole program (design.md)."""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch

from ..algos.grpovi import grpovi_rewards
from ..algos.objective import BatchContext, TrainBatch, mean_metrics, spread_rows
from ..config import Config, dump_config
from ..distributed.fsdp import (all_reduce_sum, broadcast_object, gather_objects, is_distributed, is_main,
                                push_weights, rank_and_world, rank_share, zero_pass)
from ..rollout.logprobs import ReferenceLogprobs
from ..rollout.types import Rollouts, concat_rollouts, sample_and_score
from .checkpoint import resume_run, save_run
from .evaluate import evaluate
from .alarms import clipped_share, respond
from .logger import MetricsLogger, SilentLogger
from .optim import clip_and_step
from .optune import optune_batch, sampler_metrics
from .run import Run, build_run
from .selection import select_samples


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
    sync_metrics = {}
    with timer("sync"):
        if sync_due(run.step, cfg.rollout.sync_every) and run.generator.version != run.step:
            probe = run.sync_probe if run.sync_check_every and run.pushes % run.sync_check_every == 0 else None
            sync_metrics = push_weights(run.generator, run.policy, run.step,
                                        run.reference if cfg.reference.sync == "with_generator" else None,
                                        run.sync_check, probe)
            run.pushes += 1
    with timer("generation"):
        if is_main():  # with --nproc N, rank 0 samples and scores; every rank trains on the same batch
            sample = optune_batch if run.optune_pool is not None else sample_batch
            rollouts, rewards, sampled = sample(run, rows, timer)
            if run.optune_pool is None:  # bounded staleness and dynamic sampling (off unless configured)
                drawn = (rows, rollouts, rewards)
                (rows, rollouts, rewards), sampled = select_samples(run, drawn, sampled, timer, sample_batch)
            if hasattr(run.generator, "metrics"):  # worker pools: workers/restarts
                sampled = sampled | run.generator.metrics()
        if is_distributed():  # CPU tensors on the wire: each rank moves them to its own device
            shared = (rows, rollouts.to("cpu"), rewards.cpu(), sampled) if is_main() else None
            rows, rollouts, rewards, sampled = broadcast_object(shared)
            rollouts, rewards = rollouts.to(run.device), rewards.to(run.device)
    reference = reference_for(run, rollouts)
    grpovi_metrics, scored = {}, rewards  # reward/* metrics and alarms read the rewards as scored
    if getattr(cfg.algo, "grpovi", None) is not None:
        with timer("grpovi"):
            rewards, grpovi_metrics = grpovi(run, rows, rewards, reference)
    with timer("update"):
        ctx = BatchContext(binary=torch.tensor([r["task"] in run.binary_tasks for r in rows]), reference=reference,
                           policy_version=run.step, micro_batch=cfg.train.micro_batch, rng=run.pair_rng,
                           max_new_tokens=cfg.rollout.max_new_tokens)
        batch = run.objective.make_batch(rollouts, rewards, ctx)
        update = update_policy(run, batch)
    run.step += 1
    if reference is not None:
        timer.seconds["reference"] = reference.seconds  # spent inside grpovi / update
    metrics = rollout_metrics(run, rows, rollouts, scored) | sampled | sync_metrics | grpovi_metrics | update | timing(timer)
    if metrics.get("tokens/generated") and timer.seconds.get("generate"):
        metrics["tokens/s"] = metrics["tokens/generated"] / timer.seconds["generate"]
    return metrics


def sample_batch(run: Run, rows: list[dict], timer) -> tuple[Rollouts, torch.Tensor, dict[str, float]]:
    """n samples per prompt and their rewards [G, n]. Prompts already sampled by these same weights
    (offline, or a repeat within a sync window) reuse their cached samples instead of regenerating."""
    n = run.cfg.rollout.n
    cache = run.cache.for_version(run.generator.version).entries
    missing = [r for r in rows if r["id"] not in cache]
    metrics = {"tokens/generated": 0.0, "reward/failures": 0.0}
    if missing:
        new, scores, reward_metrics = sample_and_score(run.generator, run.rewarder, run.prompts, missing, n,
                                                       run.cfg.rollout, run.sample_rng, timer)
        lengths = new.lengths
        eos = getattr(run.generator, "eos_ids", torch.tensor([run.tokenizer.eos_token_id]))
        ended = torch.isin(new.completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1),
                           eos.to(lengths.device)) & (lengths > 0)
        metrics = {"tokens/generated": sampler_metrics(new)["tokens/generated"],
                   "completion/clipped_share": clipped_share(new.completion_mask, ended, run.cfg.rollout.max_new_tokens)
                   } | reward_metrics
        for i, r in enumerate(missing):
            cache[r["id"]] = (new.select(torch.arange(i * n, (i + 1) * n)), scores[i * n:(i + 1) * n])
    parts = [cache[r["id"]] for r in rows]
    rollouts = concat_rollouts([p[0] for p in parts], run.tokenizer.pad_token_id)
    return rollouts, torch.cat([p[1] for p in parts]).float().view(len(rows), n), metrics


def reference_for(run: Run, rollouts: Rollouts) -> ReferenceLogprobs | None:
    """The reference's token log-probs of the step's rows, computed on demand, at most once per row.
    When the reference holds the very weights that sampled every row, the sampler's own log-probs
    (recorded at temperature 1) stand in and no forward runs."""
    if run.reference is None:
        return None
    version = reference_weights_version(run)
    stand_in = rollouts.sampled and version is not None and bool((rollouts.versions == version).all())
    return ReferenceLogprobs(run.reference, rollouts, run.cfg.train.micro_batch, stand_in)


def reference_weights_version(run: Run) -> int | None:
    """Which generator version's weights the reference holds, if any: the initial policy (version
    0) unless loaded from its own path; the generator's current weights when synced with it."""
    ref = run.cfg.reference
    if ref.sync == "with_generator" and (ref.path is None or run.generator.version > 0):
        return run.generator.version
    if ref.sync == "never" and ref.path is None:
        return 0
    return None


def grpovi(run: Run, rows: list[dict], rewards: torch.Tensor, reference) -> tuple[torch.Tensor, dict]:
    """GRPOVI (algorithms.md §3.3): p from the reference's sequence log-probs of the groups that train,
    bounds from each task's known reward range."""
    G, n = rewards.shape
    seq = None
    if run.cfg.algo.grpovi.probs == "reference":
        trained = spread_rows(rewards)
        seq = torch.zeros(G * n)
        seq[trained] = reference(trained).sum(dim=1).cpu()
        seq = seq.view(G, n)
    nan = float("nan")
    bounds = torch.tensor([[b if b is not None else nan for b in run.cfg.rewards.tasks[r["task"]].bounds] for r in rows])
    return grpovi_rewards(rewards, seq, bounds[:, 0], bounds[:, 1])


def update_policy(run: Run, batch: TrainBatch) -> dict:
    """Sum the objective's micro-batch gradients and step, `objective.passes` times. No pair or group
    with a signal: no optimizer step (AdamW would still decay the weights)."""
    if batch.empty:
        return {"loss": 0.0, "tokens/trained": 0.0, "update/skipped": 1.0} | batch.metrics
    # With --nproc N every rank holds the same batch and trains micro-batch i when i mod N is its rank;
    # losses carry batch-wide normalisers and gradients are summed across ranks (distributed/fsdp.py),
    # so the step is the single-process step. One process: every micro-batch, nothing to reduce.
    mine = rank_share(batch.micro, *rank_and_world())
    collected, passes = [], []
    for _ in range(run.objective.passes):
        total = 0.0
        for micro in mine:
            if micro is None:  # fewer micro-batches here than on rank 0: keep FSDP's collectives in step
                zero_pass(run.objective, run.train_policy, batch.micro[0])
                continue
            loss, m = run.objective.loss(run.train_policy, micro)
            loss.backward()
            total += loss.item()
            collected.append(m)
        passes.append(optimizer_step(run) | {"loss": all_reduce_sum(total)})
    collected = [m for part in gather_objects(collected) for m in part]
    return mean_metrics(collected) | mean_metrics(passes) | batch.metrics


def optimizer_step(run: Run) -> dict:
    out = clip_and_step(list(run.policy.parameters()), run.optimizer, run.scheduler, run.cfg.optim.grad_clip)
    if out.get("update/skipped"):
        print(f"[bridgerl] step {run.step}: non-finite gradient norm; the update was skipped")
    return out


def rollout_metrics(run: Run, rows: list[dict], rollouts: Rollouts, rewards: torch.Tensor) -> dict:
    stale = (run.step - 1 - rollouts.versions).float()  # run.step already counts this update
    m = {
        "reward/mean": rewards.float().mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward/group_std": rewards.std(dim=1).mean().item(),
        "staleness/mean": stale.mean().item(),
        "staleness/max": stale.max().item(),
        "generator/version": float(run.generator.version),
    }
    if run.optune_pool is None:  # OPTune's batch is stored pairs: its sampler statistics come from `sampled`
        sampler = sampler_metrics(rollouts, getattr(run.generator, "reports_entropy", True))
        m |= {k: v for k, v in sampler.items() if k != "tokens/generated"}
    tasks = sorted({r["task"] for r in rows})
    if len(tasks) > 1:
        for t in tasks:
            sel = torch.tensor([r["task"] == t for r in rows])
            m[f"reward/{t}/mean"] = rewards[sel].mean().item()
    return m


def timing(timer: Timer) -> dict:
    # generate and reward run inside generation, reference inside grpovi / update: not counted twice
    total = sum(v for k, v in timer.seconds.items() if k not in ("generate", "reward", "reference"))
    return {f"time/{k}": v for k, v in timer.seconds.items()} | {"time/step": total}


def train(cfg: Config, resume: bool = False, run: Run | None = None, force: bool = False) -> Run:
    run = run or build_run(cfg)
    if resume:
        resume_run(run, force=force)  # refuses a config that changes the run before anything is written
    logger = MetricsLogger(run.out_dir, cfg.log, resume=resume) if is_main() else SilentLogger()
    if is_main():
        dump_config(cfg, run.out_dir / "config.yaml")
    if is_distributed() and run.eval_rows:
        # Sampling from the sharded policy needs every rank in every decode step; evaluate final/ instead.
        if is_main():
            print("[bridgerl] --nproc: held-out evaluation is skipped during training; run `bridgerl eval "
                  f"{run.out_dir / 'final'}` afterwards")
        run.eval_rows = []
    if run.step == 0:
        start = (evaluate(run) if cfg.eval.at_start and run.eval_rows else {}) | \
            (run.monitor.maybe_measure(run.policy, 0) if run.monitor else {})
        if start:
            logger.log(0, start)
    progress = logger.progress(cfg.train.steps, initial=run.step)
    while run.step < cfg.train.steps:
        metrics = train_step(run)
        if run.monitor:
            metrics |= run.monitor.maybe_measure(run.policy, run.step)
        warnings = run.alarm.update(metrics)
        metrics |= run.alarm.flags()
        step = run.step
        stop = respond(run, run.alarm, warnings, cfg.train.on_collapse, cfg.train.alarms.rollback_lr_factor,
                       cfg.train.alarms.max_rollbacks)
        if run.step != step:  # rolled back: the replayed steps are logged again
            logger.log(step, metrics)
            continue
        if cfg.eval.every and run.step % cfg.eval.every == 0 and run.eval_rows and run.step < cfg.train.steps:
            metrics |= evaluate(run)
        logger.log(run.step, metrics)
        progress.update(metrics)
        every = cfg.train.checkpoint_every
        if every and run.step % every == 0 and run.step < cfg.train.steps:
            save_run(run)
        if stop:
            break
    progress.close()
    if run.eval_rows:
        logger.log(run.step, evaluate(run), final=True)
    save_run(run)
    if cfg.train.save_final and is_distributed():
        from ..distributed.checkpoint import save_final_hf
        save_final_hf(run.policy, run.tokenizer, run.out_dir / "final")  # every rank gathers, rank 0 writes
    elif cfg.train.save_final:
        final = run.out_dir / "final"
        run.policy.save_pretrained(final)
        run.tokenizer.save_pretrained(final)
        if cfg.model.lora and cfg.model.lora.save_merged:
            merged = copy.deepcopy(run.policy).merge_and_unload()  # the run's policy keeps its adapter
            merged.save_pretrained(final / "merged")
            run.tokenizer.save_pretrained(final / "merged")
    run.generator.close()  # vLLM engines, servers' sessions and Ray workers are let go here
    logger.close()
    return run
