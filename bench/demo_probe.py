"""One calibration probe of the demo: train one regime from the demo's SFT seed with some settings
changed, and print its final sampled held-out score (the demo's headline measure).

    python bench/demo_probe.py offline_dpo 0 lr=2e-4              # regime slug, training seed, DemoSettings overrides
    python bench/demo_probe.py online_dpo 1 steps=200 --ref never   # also: the DPO reference fixed (never synced)
    python bench/demo_probe.py seed 0                                # the seed model's own score
    python bench/demo_probe.py all 0,1,2 --base quick --jobs 2 lr=2e-4   # every regime × 3 seeds, a table

The tiny model and the seed are cached stages under --demo (default runs/demo-probe; a full demo
folder works too), so every probe starts from the same seed (the quick and full demos share it).
`--base` picks the preset the overrides apply to. Each run is a cached stage under --out, so a
repeated probe is read back, not retrained. One torch thread per run; `--jobs` runs that many at
once. docs/demo.md's calibration tables were measured with this script.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace
from functools import partial
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
    ap.add_argument("regime", help="offline_dpo, semi_online_dpo_s5, semi_online_dpo_s20, online_dpo, grpo (or several, "
                    "comma-separated), all, or seed")
    ap.add_argument("seeds", help="training seed(s), comma-separated")
    ap.add_argument("overrides", nargs="*", help="DemoSettings fields, e.g. lr=2e-4 steps=200 semi_online=5,20")
    ap.add_argument("--base", choices=["full", "quick"], default="full", help="the preset the overrides change")
    ap.add_argument("--ref", choices=["never", "with_generator"], help="DPO reference sync (default: the demo's)")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at once (one torch thread each)")
    ap.add_argument("--demo", default="runs/demo-probe", help="folder holding (or receiving) the cached seed")
    ap.add_argument("--out", default="runs/demo-probe/probes")
    args = ap.parse_intermixed_args()

    import torch

    torch.set_num_threads(1)
    from bridgerl.demo import FULL, QUICK, tiny_and_seed_stages
    from bridgerl.demo import pipeline as P
    from bridgerl.demo.stages import Stage, StageRunner, fingerprint
    from bridgerl.report.summary import across_seeds

    st = replace(QUICK if args.base == "quick" else FULL, **parse_overrides(args.overrides))
    seeds = [int(s) for s in args.seeds.split(",")]
    base, out = Path(args.demo), Path(args.out)
    runner = StageRunner(base, total=2)
    _, seeded = tiny_and_seed_stages(runner, base, FULL, 0)  # the demo's seed, whatever the overrides
    seed_model = Path(seeded.result["model"])
    tag = "_".join([args.base] + args.overrides + ([f"ref_{args.ref}"] if args.ref else []))
    probes = StageRunner(out, total=0)
    eval_keys = {k: getattr(st, k) for k in P.FINAL_EVAL_KEYS}
    seed_score = probes.run("seed: sampled score", out / f"seed_{fingerprint(eval_keys)}", eval_keys,
                            partial(P.sampled_score, seed_model, st, 0)).result
    print(f"seed {seed_score['mean']:.3f} ± {seed_score['se']:.3f}  ({P.sampled_label(st)})")
    if args.regime == "seed":
        return
    regimes = {r.slug: r for r in P.verifiable_regimes(st)}
    chosen = list(regimes) if args.regime == "all" else args.regime.split(",")
    if any(r not in regimes for r in chosen):
        raise SystemExit(f"unknown regime '{args.regime}'; one of: {', '.join(regimes)}, all, seed")
    stages = []
    for slug in chosen:
        overrides = dict(regimes[slug].overrides)
        if args.ref and "reference" in overrides:
            overrides["reference"] = {"sync": args.ref}
        for s in seeds:
            folder = out / tag / slug / f"seed{s}"
            raw = P.merge_dicts(P.base_config(st, seed_model, folder, s), overrides)
            stages.append(Stage(f"{slug} seed {s}", folder, raw | {"final_eval": eval_keys},
                                partial(P.stage_train_scored, raw=raw, st=st, seed=0)))
    probes.total = len(stages)
    with probes:
        done = iter(probes.run_many(stages, args.jobs))
    print(f"{tag}: {st.rl_budget()}, lr {st.lr}")
    for slug in chosen:
        finals = [next(done).result["sampled"]["mean"] for _ in seeds]
        mean, se = across_seeds(finals)
        print(f"RESULT {slug:20s} {mean - seed_score['mean']:+.3f} ± {se:.3f}  per seed "
              + " ".join(f"{v:.3f}" for v in finals))


if __name__ == "__main__":
    main()
