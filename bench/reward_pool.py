"""Reward time per step: in the trainer process (rewards.processes=0, the path before the worker
pool) vs the worker pool, on the completions a real run produces.

Records the reward router's inputs over the steps of bench/profile_step.py's GRPO and online DPO
runs (micro model, 1 torch thread), then scores every recorded step with both routers in one
process, alternating which goes first, so a shared machine's load hits both alike.

    python bench/reward_pool.py [--processes 2] [--steps 12] [--group 1]

--group k scores k recorded steps at once (bigger batches)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import peers  # noqa: E402


def record(steps: int) -> list[dict]:
    from bridgerl.train.loop import train_step
    from bridgerl.train.setup import build_run

    model = peers.prepared_model("micro", Path(peers.default_cache_dir()))
    batches: list[dict] = []
    for algo in ("grpo", "dpo"):
        defaults = vars(peers.parse_args([]))
        w = peers.work_for(algo, model, argparse.Namespace(**defaults | {
            "steps": steps, "device": "cpu", "dtype": "fp32", "lr": peers.DEFAULT_LR}))
        cfg = peers.bridgerl_config(w, tempfile.mkdtemp(prefix="reward-pool-"))
        cfg.rewards.processes = 0
        run = build_run(cfg)
        real = run.rewarder

        def recorder(prompts, completions, rows, real=real):
            batches.append({"prompts": list(prompts), "completions": list(completions),
                            "rows": [{k: v for k, v in r.items() if k != "prompt"} for r in rows]})
            return real(prompts, completions, rows)
        run.rewarder = recorder
        for _ in range(steps):
            train_step(run)
    return batches


def forget_scores() -> None:
    """Empty this process's Math-Verify, latex2sympy and sympy caches (the workers start empty)."""
    import math_verify.parser
    from sympy.core.cache import clear_cache

    import bridgerl.rewards.math as bm

    clear_cache()
    bm._parse_gold.cache_clear()
    for module in (math_verify.parser,):
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="recorded steps per algorithm")
    p.add_argument("--group", type=int, default=1, help="recorded steps scored together")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from bridgerl.rewards.math import math_reward
    from bridgerl.rewards.pool import PooledReward, RewardPool
    from bridgerl.rewards.registry import MATH_SPEC
    from bridgerl.rewards.router import RewardRouter

    recorded = record(args.steps)
    forget_scores()  # recording scored these very completions here: the in-process side would hit warm caches
    batches = [{k: sum((b[k] for b in recorded[i:i + args.group]), []) for k in recorded[0]}
               for i in range(0, len(recorded) - args.group + 1, args.group)]
    pool = RewardPool(args.processes, preload=(MATH_SPEC,))
    pool.wait_ready()
    routers = {"in process": RewardRouter({"arithmetic": math_reward}),
               f"{args.processes} workers": RewardRouter({"arithmetic": PooledReward(MATH_SPEC, pool, True, {"timeout_s": 5})})}
    seconds: dict[str, list[float]] = {k: [] for k in routers}
    for k, b in enumerate(batches):
        for name in (list(routers) if k % 2 == 0 else list(routers)[::-1]):
            start = time.perf_counter()
            routers[name](b["prompts"], b["completions"], b["rows"])
            seconds[name].append(time.perf_counter() - start)
    pool.close()
    skip = 1 if len(batches) > 2 else 0  # first call: caches cold on both sides
    print(f"reward wall ms per step, median of {len(batches) - skip} steps of {len(batches[0]['completions'])} "
          f"samples (load average {os.getloadavg()[0]:.2f}): " +
          " | ".join(f"{n} {1000 * statistics.median(v[skip:]):.1f}" for n, v in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
