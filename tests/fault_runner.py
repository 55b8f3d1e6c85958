"""`bridgerl train` that SIGKILLs itself at a chosen point: the n-th generation, the n-th optimizer
step, or halfway through writing the n-th checkpoint's tensors. Used by test_faults.py:

    python tests/fault_runner.py PHASE N bridgerl-args...     (PHASE: generation|update|checkpoint|none)

A real kill -9 from inside is exact about *where* it lands, which an outside timer is not."""
from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    phase, at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = {"n": 0}

    def nth() -> bool:
        calls["n"] += 1
        return calls["n"] == at

    import bridgerl.train.checkpoint as ckpt
    import bridgerl.train.loop as loop
    from bridgerl.rollout.hf import HFGenerator

    if phase == "generation":
        real_generate = HFGenerator.generate

        def generate(self, *a, **k):
            out = real_generate(self, *a, **k)  # the samples exist, nothing is saved yet
            if nth():
                die()
            return out
        HFGenerator.generate = generate
    elif phase == "update":
        real_step = loop.optimizer_step

        def optimizer_step(run):
            out = real_step(run)  # weights updated in memory, step not logged or saved
            if nth():
                die()
            return out
        loop.optimizer_step = optimizer_step
    elif phase == "checkpoint":
        real_write = ckpt._write

        def write(path, data):
            if path.name == ckpt.TENSOR_FILE and nth():
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                die()
            real_write(path, data)
        ckpt._write = write
    from bridgerl.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
