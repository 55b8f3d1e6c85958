"""The reward pool on an overloaded machine: no healthy worker may be killed.

    python bench/reward_pool_stress.py --burners 4 --seconds 120

Starts `--burners` CPU-burning processes, then scores 300 Math-Verify samples per call in a 2-worker
RewardPool with a 2 s timeout for `--seconds`, and prints calls, failures and kills. Every sample
is easy (a few ms), so every kill is a false one; each prints the board the parent read. This is
how the half-written-board kill was found (docs/reliability.md): before the fix, 1 kill in 2,539
calls with 4 burners on 2 cores; after it, 0 in 2,545 (4 burners) and 1,853 (6 burners).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from bridgerl.rewards import pool as P
from bridgerl.rewards.registry import MATH_SPEC
from bridgerl.rewards.timeout import process_cpu_seconds


def burn(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burners", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=120.0)
    args = ap.parse_args()

    report = P.RewardPool._on_timeout

    def spy(self, w, pos, timeout_s, results, todo):
        job, p, since, cpu_since = P._read(w.board)
        print(f"KILL chunk {w.chunk.job}: board job {job} position {p}, {time.monotonic() - since:.2f} s since its "
              f"start, {time.monotonic() - w.chunk.sent:.2f} s since sent, worker CPU {process_cpu_seconds(w.process.pid)} "
              f"(at start {cpu_since:.2f})", flush=True)
        return report(self, w, pos, timeout_s, results, todo)

    P.RewardPool._on_timeout = spy
    burners = [mp.Process(target=burn, args=(args.seconds + 60,)) for _ in range(args.burners)]
    for b in burners:
        b.start()
    pool = P.RewardPool(2, preload=(MATH_SPEC,))
    try:
        pool.wait_ready(120)
        fn = P.PooledReward(MATH_SPEC, pool, per_sample=True, extra={"timeout_s": 1.0})
        sums = [(a, b) for a in range(10) for b in range(10)] * 3
        columns = {"completions": [f"{a} + {b} = {a + b}. The final answer is $\\boxed{{{a + b}}}$." for a, b in sums],
                   "answer": [str(a + b) for a, b in sums]}
        calls = failures = 0
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            out = fn.run(columns, len(sums), timeout_s=2.0)
            calls += 1
            failures += sum(isinstance(o, P.Failure) for o in out)
        print(f"calls {calls}, failures {failures}, kills {pool.kills} ({args.burners} burners, {args.seconds:.0f} s)")
    finally:
        for b in burners:
            b.terminate()
        pool.close()


if __name__ == "__main__":
    main()
