"""`bridgerl train CONFIG --nproc N`: re-run the same command under torchrun on N ranks.

The line is printed first, so it can be copied to a cluster scheduler (add --nnodes/--rdzv_endpoint
for several nodes; see docs/scale.md)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys


def torchrun_argv(nproc: int, cli_args: list[str]) -> list[str]:
    """The torchrun command (as python -m torch.distributed.run, so the same interpreter runs it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "bridgerl.cli", *cli_args]


def printable(nproc: int, cli_args: list[str]) -> str:
    return shlex.join(["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "bridgerl.cli", *cli_args])


def launch(nproc: int, cli_args: list[str]) -> int:
    """Runs `bridgerl <cli_args>` on `nproc` local ranks and returns torchrun's exit code. On CPU each
    rank gets one torch thread unless OMP_NUM_THREADS says otherwise (N ranks × all cores thrash)."""
    print(f"[bridgerl] {printable(nproc, cli_args)}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(torchrun_argv(nproc, cli_args), env=env)
