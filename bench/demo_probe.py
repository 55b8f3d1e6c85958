"""One calibration probe of the demo: train one regime from the demo's SFT seed with some settings
changed, and print its final sampled held-out score (the demo's headline measure).

    python bench/demo_probe.py offline_dpo 0 lr=2e-4              # regime slug, training seed, DemoSettings overrides
    python bench/demo_probe.py online_dpo 1 steps=200 --ref never   # also: the DPO reference fixed (never synced)
    python bench/demo_probe.py seed 0                                # the seed model's own score

The tiny model and the seed are cached stages under --demo (default runs/demo-probe; a full demo
folder works too), so every probe starts from the same seed. One torch thread: run two probes side
by side on two cores. docs/demo.md's calibration table was measured with this script.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_overrides(pairs: list[str]) -> dict:
    from bridgerl.demo import FULL

    types = {f.name: type(getattr(FULL, f.name)) for f in fields(FULL)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"unknown demo setting '{key}'; one of: {', '.join(sorted(types))}")
        kind = types[key]
        out[key] = (kind(float(value)) if kind in (int, float) else
                    tuple(int(v) for v in value.split(",")) if kind is tuple else kind(value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("regime", help="offline_dpo, semi_online_dpo_s5, semi_online_dpo_s20, online_dpo, grpo, or seed")
    ap.add_argument("seed", type=int, help="training seed")
    ap.add_argument("overrides", nargs="*", help="DemoSettings fields, e.g. lr=2e-4 steps=200 semi_online=5,20")
    ap.add_argument("--ref", choices=["never", "with_generator"], help="DPO reference sync (default: the demo's)")
    ap.add_argument("--demo", default="runs/demo-probe", help="folder holding (or receiving) the cached seed")
    ap.add_argument("--out", default="runs/demo-probe/probes")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from bridgerl.demo import FULL, tiny_and_seed_stages
    from bridgerl.demo import pipeline as P
    from bridgerl.demo.stages import StageRunner

    st = replace(FULL, **parse_overrides(args.overrides))
    base = Path(args.demo)
    runner = StageRunner(base, total=2)
    _, seeded = tiny_and_seed_stages(runner, base, FULL, 0)  # the demo's seed, whatever the overrides
    seed_model = Path(seeded.result["model"])
    tag = "_".join(args.overrides + ([f"ref_{args.ref}"] if args.ref else [])) or "default"
    if args.regime == "seed":
        score = P.sampled_score(seed_model, st, 0, Path(args.out) / tag / "seed")
        print("RESULT seed", json.dumps(score))
        return
    regimes = {r.slug: r for r in P.verifiable_regimes(st)}
    if args.regime not in regimes:
        raise SystemExit(f"unknown regime '{args.regime}'; one of: {', '.join(regimes)}, seed")
    overrides = dict(regimes[args.regime].overrides)
    if args.ref:
        overrides["reference"] = {"sync": args.ref}
    folder = Path(args.out) / tag / args.regime / f"seed{args.seed}"
    raw = P.merge_dicts(P.base_config(st, seed_model, folder, args.seed), overrides)
    start = time.perf_counter()
    res = P.stage_train_scored(folder, raw, st, 0)
    print("RESULT", args.regime, args.seed, tag, json.dumps(
        {"sampled": res["sampled"]["mean"], "greedy": res["eval/score"], "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
