"""Where a bridgerl step spends its time, so the next optimisation is chosen from numbers.

Runs the same work as bench/peers.py (same prepared tiny models, prompts, group size, β, ...)
with bridgerl alone and times each part of `train_step` by wrapping, from outside, the
functions the loop calls:

  sync        generator.load_weights (policy → generator copy, in place)
  generation  generator.generate (prefill + KV-cached decode + detokenise)
  reward      the reward router (Math-Verify, per-sample timeout)
  ref logps   token_logprobs on the reference model (no grad)
  policy fwd  token_logprobs on the policy (with grad)
  backward    loss.backward()
  optimizer   clip + AdamW step + zero_grad
  other       the rest: batch assembly, advantages / pairs, loss math, metrics

    python bench/profile_step.py                        # GRPO and online DPO, micro and small
    python bench/profile_step.py --sizes micro --torch-profiler   # plus the top torch ops of one step
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import peers  # noqa: E402

PARTS = ("sync", "generation", "reward", "ref logps", "policy fwd", "backward", "optimizer", "other")


class PartTimer:
    """Seconds per named part: process CPU time on CPU (steady on a shared machine, see
    peers.Clock), synchronised wall time on CUDA."""

    def __init__(self, device: str, wall: bool = False):
        # --wall: reward workers are other processes, whose CPU time process_time() does not see.
        self.clock = time.perf_counter if wall else time.process_time if device == "cpu" else (lambda: peers.now(device))
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name if isinstance(name, str) else name(*args)] += self.clock() - start
        return timed


def instrument(run, timer: PartTimer):
    """Wrap what train_step calls; returns a function that undoes the module-level patches."""
    import bridgerl.algos.dpo
    import bridgerl.algos.group_dpo
    import bridgerl.algos.grpo
    import bridgerl.rollout.logprobs
    import bridgerl.train.loop as loop

    forwards = [bridgerl.algos.dpo, bridgerl.algos.group_dpo, bridgerl.algos.grpo, bridgerl.rollout.logprobs]

    run.generator.load_weights = timer.wrap("sync", run.generator.load_weights)
    run.generator.generate = timer.wrap("generation", run.generator.generate)
    run.rewarder = timer.wrap("reward", run.rewarder)
    saved = (forwards[0].token_logprobs, loop.optimizer_step, torch.Tensor.backward)
    timed_forward = timer.wrap(lambda model, *a, **k: "ref logps" if model is run.reference else "policy fwd",
                               saved[0])
    for module in forwards:
        module.token_logprobs = timed_forward
    loop.optimizer_step = timer.wrap("optimizer", loop.optimizer_step)
    torch.Tensor.backward = timer.wrap("backward", torch.Tensor.backward)

    def undo():
        for module in forwards:
            module.token_logprobs = saved[0]
        loop.optimizer_step, torch.Tensor.backward = saved[1:]
    return undo


def profile_work(w: peers.Work, skip: int, torch_profiler: bool, wall: bool = False,
                 reward_processes: int | None = None) -> dict[str, list[float]]:
    from bridgerl.train.loop import train_step
    from bridgerl.train.run import build_run

    cfg = peers.bridgerl_config(w, tempfile.mkdtemp(prefix="profile-"))
    if reward_processes is not None:
        cfg.rewards.processes = reward_processes
    run = build_run(cfg)
    timer = PartTimer(w.device, wall)
    undo = instrument(run, timer)
    per_step: dict[str, list[float]] = defaultdict(list)
    try:
        for i in range(w.steps):
            timer.seconds.clear()
            start = timer.clock()
            if torch_profiler and i == w.steps - 1:
                with torch.profiler.profile(activities=_activities(w.device)) as prof:
                    m = train_step(run)
                sort = "self_cuda_time_total" if w.device == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=25))
            else:
                m = train_step(run)
            total = timer.clock() - start
            if i < skip:
                continue
            for part in PARTS[:-1]:
                per_step[part].append(timer.seconds.get(part, 0.0))
            per_step["other"].append(total - sum(timer.seconds.values()))
            per_step["step"].append(total)
            per_step["tokens"].append(m["tokens/generated"])
            per_step["trained"].append(m.get("tokens/trained", 0.0))
    finally:
        undo()
    return per_step


def profile_trl(w: peers.Work, skip: int) -> dict[str, list[float]]:
    """The same parts for TRL's trainer on the same work (its step, timed between step ends)."""
    import warnings

    from transformers import TrainerCallback

    timer = PartTimer(w.device)
    log = {"prompts": [], "completions": [], "tokens": [], "reward": []}
    reward = timer.wrap("reward", peers.trl_reward(w, set(), log))
    trainer = peers.make_trl(w, tempfile.mkdtemp(prefix="profile-trl-"), reward)
    ref = getattr(trainer, "ref_model", None)
    trainer._generate = timer.wrap("generation", trainer._generate)
    if w.algo == "grpo":
        trainer._get_per_token_logps_and_entropies = timer.wrap(
            lambda model, *a, **k: "ref logps" if model is ref else "policy fwd", trainer._get_per_token_logps_and_entropies)
    else:
        trainer._forward = timer.wrap(lambda model, *a, **k: "ref logps" if model is ref else "policy fwd",
                                      trainer._forward)
    trainer._clip_grad_norm = timer.wrap("optimizer", trainer._clip_grad_norm)
    saved = (torch.Tensor.backward, torch.optim.AdamW.step)
    torch.Tensor.backward = timer.wrap("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = timer.wrap("optimizer", torch.optim.AdamW.step)
    per_step: dict[str, list[float]] = defaultdict(list)

    class Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = timer.clock()
            timer.seconds.clear()

        def on_step_end(self, args, state, control, **kwargs):
            total = timer.clock() - self.start
            if state.global_step > skip:
                for part in PARTS[:-1]:
                    per_step[part].append(timer.seconds.get(part, 0.0))
                per_step["other"].append(total - sum(timer.seconds.values()))
                per_step["step"].append(total)
                per_step["tokens"].append(log["tokens"][-1])
                per_step["trained"].append(log["tokens"][-1])
            timer.seconds.clear()
            self.start = timer.clock()

    trainer.add_callback(Steps())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        torch.Tensor.backward, torch.optim.AdamW.step = saved
    return per_step


def _activities(device: str):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def report(name: str, per_step: dict[str, list[float]]) -> str:
    med = {k: statistics.median(v) for k, v in per_step.items()}
    step = med["step"]
    cells = " | ".join(f"{1000 * med[p]:.0f} ({100 * med[p] / step:.0f}%)" for p in PARTS)
    return (f"| {name} | {1000 * step:.0f} | {cells} | {med['tokens']:.0f} / {med['trained']:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="micro,small")
    p.add_argument("--algos", default="grpo,dpo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=peers.DEFAULT_LR)
    p.add_argument("--torch-profiler", action="store_true", help="print the top torch ops of the last step")
    p.add_argument("--trl", action="store_true", help="also break down TRL's step on the same work")
    p.add_argument("--wall", action="store_true", help="wall-clock time (rewards in worker processes: their "
                                                       "CPU time is not this process's)")
    p.add_argument("--reward-processes", type=int, help="rewards.processes (default: the config's)")
    p.add_argument("--cache-dir", default=peers.default_cache_dir())
    args = p.parse_args(argv)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        model = peers.prepared_model(size, cache)
        for algo in args.algos.split(","):
            defaults = vars(peers.parse_args([]))
            w = peers.work_for(algo, model, argparse.Namespace(**defaults | {
                "steps": args.steps, "device": args.device, "dtype": args.dtype, "lr": args.lr}))
            t0 = time.perf_counter()
            name = f"{'GRPO' if algo == 'grpo' else 'online DPO'} {size}"
            rows.append(report(f"bridgerl {name}", profile_work(w, args.skip, args.torch_profiler, args.wall,
                                                                args.reward_processes)))
            print(rows[-1], f"[{time.perf_counter() - t0:.0f}s]", flush=True)
            if args.trl:
                t0 = time.perf_counter()
                rows.append(report(f"TRL {name}", profile_trl(w, args.skip)))
                print(rows[-1], f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    clock = "wall" if args.wall or args.device != "cpu" else "CPU"
    print(f"\nmedian {clock} ms per step (share of step); {args.steps - args.skip} steps after {args.skip} warm-up; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| run | step | " + " | ".join(PARTS) + " | tokens generated / trained |")
    print("|" + "|".join(["---"] * (len(PARTS) + 3)) + "|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
