"""DELT data efficacy on a tiny model: same data, same budget, different order / selection.

    python bench/efficacy.py                   # 3 seeds, 4000 SFT rows, ~15-20 min on a shared 2-core CPU
    python bench/efficacy.py --quick           # 2 seeds, 480 rows, ~1-2 min (a smoke run: accuracy stays ~0)
    python bench/efficacy.py --check-only      # scorer + the LQS quality check only
    python bench/efficacy.py --seeds 5 --out runs/bench_efficacy

Setup (algorithms.md §4; the paper's anchor is 36.37 -> 38.08, shuffle -> LQS + folding at 160M):
- Data D: one built-in arithmetic pool mixing levels (default tiny + easy, equal shares), train split,
  one fixed draw for every seed. A quality axis: `--corrupt` (0.2) of D gets a wrong target
  (`--corrupt-kind`: swap = another row's worked solution, the default; shift = the result moved by
  1-5; random_text = the sanity case). Held-out rows stay correct.
- Every run: a fresh tiny Llama (the seed sets its init and sft's shuffle), then
  `bridgerl.supervised.sft.sft` for |D| / batch steps (one pass over D, the paper's single epoch),
  cosine LR decaying to 10 % of the peak (`--min-lr-ratio`, the paper's floor). The only thing that changes between conditions is the `order` of
  row indices handed to `sft`; the shuffle baseline is sft's own seeded shuffle. Top-ratio runs keep
  the same step budget, so they pass over the kept rows more than once.
- Scores are computed once, by a separate scorer model (init seed 1000, warmed up by 300 SFT steps on
  2000 proxy rows disjoint from D): loss = its answer-token NLL (`loss_based_scores`, high = hard);
  LQS = `lqs_for_rows` (proxy run of plain SGD from the scorer over D, T = 100, η = 0.05, every 10
  steps scored), whose high-quality target set J is a separate train-split draw of 128 rows per level,
  disjoint from D and the proxy rows, and never the eval rows (the tiny level has only ~8 held-out
  sums, so a test-split draw would repeat the eval problems).
- Before orders are compared, the quality check: how well each score ranks the clean rows of D above
  the corrupted ones (AUC); LQS must reach `--quality-auc`, or its orders are no evidence about DELT.
- Eval: held-out split (problems never in training), equal shares per level: greedy accuracy with
  `math_reward`, and answer-token NLL per row.
Errors: "± SE" is the standard error of the mean over seeds × eval items, clustered by seed
(std of the per-seed means / sqrt(seeds)): items scored by one model are not independent. "seeds"
is the range of per-seed means. Δ is paired with the shuffle run of the same seed on the same items,
and its SE is clustered the same way. The JSON also holds the unclustered item-level SEs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from bridgerl.config import SamplingConfig, SFTConfig
from bridgerl.data.efficacy import apply_efficacy, spearman
from bridgerl.data.delt import loss_based_scores, lqs_for_rows, scores_from_file, write_scores
from bridgerl.data.encoding import answer_samples, encode_sft
from bridgerl.data.lqs import per_sample_grad_throughput
from bridgerl.data.scorers import loss_scores, samples_from_prompt_lengths
from bridgerl.data.tasks import builtin_rows
from bridgerl.models import load_causal_lm, load_tokenizer, make_tiny_model
from bridgerl.rewards.math import math_reward
from bridgerl.rollout.hf import HFGenerator
from bridgerl.supervised.sft import sft

SCORER_SEED = 1000  # the scorer's init; training seeds are 0..S-1, so it never equals a trained model's
DATA_SEED, PROXY_SEED, TARGET_SEED, EVAL_SEED = 0, 1, 2, 3

# (name, scorer, select, order, kept share for top_ratio, fraction of the step budget); shuffle ignores
# the scores. "-loss" is the negated loss, so top_ratio keeps the lowest-loss rows (the cheap quality filter).
CONDITIONS = [
    ("shuffle", None, "all", "shuffle", 1.0, 1.0),
    ("random scores, sorted", "random", "all", "sorted", 1.0, 1.0),  # control: the explicit-order path, no signal
    ("sorted / LQS", "lqs", "all", "sorted", 1.0, 1.0),
    ("folding / LQS", "lqs", "all", "folding", 1.0, 1.0),
    ("top80 / LQS, shuffled", "lqs", "top_ratio", "shuffle", 0.8, 1.0),  # selection alone
    ("top80+fold / LQS", "lqs", "top_ratio", "folding", 0.8, 1.0),
    ("top50+fold / LQS", "lqs", "top_ratio", "folding", 0.5, 1.0),
    ("sorted / loss", "loss", "all", "sorted", 1.0, 1.0),  # easy -> hard
    ("folding / loss", "loss", "all", "folding", 1.0, 1.0),
    ("top80 / -loss, shuffled", "-loss", "top_ratio", "shuffle", 0.8, 1.0),  # drops the highest-loss 20 %
]


# ---------------------------------------------------------------- data

def level_rows(levels, per_level: int, seed: int, split: str, exclude: set[str] = frozenset()) -> list[dict]:
    """`per_level` distinct rows of each arithmetic level, none whose prompt is in `exclude`.

    Distinct across the whole mix: each level's rows are distinct, but the levels overlap (a
    one-digit sum is also an `easy` problem), so a plain draw of the default mix repeats 145
    prompts; repeated prompts share one score id, which the score files reject, and would weight
    those problems twice."""
    out, exclude = [], set(exclude)
    for level in levels:
        ask, kept, before = per_level, [], -1
        while True:  # draws of one seed are prefixes of each other, so asking for more only appends
            seen, kept = set(exclude), []
            for r in builtin_rows(f"arithmetic:{level}", ask, seed, split):
                if r["prompt"] not in seen:
                    seen.add(r["prompt"])
                    kept.append(r)
            if len(kept) >= per_level:
                break
            if len(kept) == before:  # the last, larger draw found no new problem
                raise ValueError(f"arithmetic:{level} ({split}) has only {len(kept)} distinct problems outside "
                                 f"the excluded ones; ask for fewer than {per_level} rows per level")
            before = len(kept)
            ask += 2 * (per_level - len(kept))
        out += kept[:per_level]
        exclude |= {r["prompt"] for r in kept[:per_level]}
    return [dict(r, completion=r["solution"]) for r in out]


CORRUPT_KINDS = ("shift", "swap", "random_text")


def corrupt_rows(rows: list[dict], share: float, seed: int, kind: str = "shift") -> tuple[list[dict], np.ndarray]:
    """A quality axis for the scores to find: `share` of the rows get a wrong target, the rest stay
    correct. Returns the rows and a bool mask of the corrupted ones. Held-out rows are never corrupted.

    kind: "shift"       the worked solution's result and boxed answer moved by 1-5 (well-formed, wrong);
          "swap"        the worked solution of another row (well-formed, about another problem);
          "random_text" random letters, digits and spaces of the solution's length (the easy sanity case)."""
    if kind not in CORRUPT_KINDS:
        raise ValueError(f"unknown corruption kind {kind!r}; use one of {', '.join(CORRUPT_KINDS)}")
    rng = np.random.default_rng(seed)
    bad = np.zeros(len(rows), dtype=bool)
    bad[rng.choice(len(rows), size=round(share * len(rows)), replace=False)] = True
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789     "))
    out = []
    for i, (row, corrupt) in enumerate(zip(rows, bad)):
        if corrupt:
            answer = int(row["answer"])
            if kind == "shift":
                wrong = answer + int(rng.choice([-1, 1])) * int(rng.integers(1, 6))
                wrong = wrong if wrong >= 0 else answer + abs(wrong - answer)
                completion = row["completion"].replace(f"= {answer}.", f"= {wrong}.").replace(
                    f"\\boxed{{{answer}}}", f"\\boxed{{{wrong}}}")
            elif kind == "swap":
                others = [j for j in rng.permutation(len(rows))[:8].tolist()
                          if rows[j]["answer"] != row["answer"] and j != i]
                completion = rows[others[0]]["completion"] if others else ""
            else:
                completion = "".join(rng.choice(alphabet, size=len(row["completion"])))
            if completion == row["completion"] or not completion:
                raise ValueError(f"could not corrupt the target of {row['prompt']!r}: {completion!r}")
            row = dict(row, completion=completion)
        out.append(row)
    return out, bad


def auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a score from `high` > a score from `low`), ties counted half: 1.0 ranks every `high` row
    above every `low` row, 0.5 is no better than chance."""
    high, low = np.asarray(high, dtype=np.float64), np.asarray(low, dtype=np.float64)
    greater = (high[:, None] > low[None, :]).mean()
    ties = (high[:, None] == low[None, :]).mean()
    return float(greater + 0.5 * ties)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"], "task": r["task"]}) + "\n")
    return path


def sft_config(model: Path, train: Path, out: Path, args, steps: int, seed: int, rows: int,
               min_lr_ratio: float = 0.0) -> SFTConfig:
    return SFTConfig.model_validate({
        "model": {"path": str(model)},
        "data": {"train": str(train), "num_train": rows},
        "optim": {"lr": args.lr, "schedule": "cosine", "warmup_steps": max(1, steps // 15),
                  "min_lr_ratio": min_lr_ratio},
        "steps": steps, "batch_size": args.batch_size, "seed": seed, "out_dir": str(out), "device": "cpu",
        "log_every": max(1, steps),
    })


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model_dir: Path, eval_rows: list[dict], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy [E] in {0,1}, answer-token NLL [E]) of the model on the held-out rows."""
    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir))
    model.eval()
    encoded = encode_sft(tok, eval_rows, 256)
    nll = loss_scores(model, samples_from_prompt_lengths(encoded), batch_size=64, pad_id=tok.pad_token_id,
                      progress=False)
    gen = HFGenerator(model, tok, batch_size=256, share_weights=True)
    greedy = SamplingConfig(temperature=0, max_new_tokens=max_new_tokens)
    out = gen.generate([ids[:plen] for ids, plen in encoded], 1, greedy)
    acc = np.asarray(math_reward(out.completions, answer=[r["answer"] for r in eval_rows]), dtype=np.float64)
    return acc, nll


def summary(values: np.ndarray, base: np.ndarray | None) -> dict:
    """values [S, E] -> mean ± SE, per-seed means, and the paired difference to `base` [S, E].

    se: seed-clustered, std(per-seed means) / sqrt(S). Items scored by one model are not independent,
    and seed-to-seed spread dominates here, so the pooled std / sqrt(S·E) (kept as se_items) would be
    far too small. With one seed, se falls back to se_items.
    """
    def se_pair(x: np.ndarray) -> tuple[float, float]:
        s, e = x.shape
        items = float(x.std(ddof=1) / math.sqrt(s * e)) if s * e > 1 else 0.0
        return (float(x.mean(1).std(ddof=1) / math.sqrt(s)) if s > 1 else items), items

    per_seed = values.mean(1)
    se, se_items = se_pair(values)
    out = {"mean": float(values.mean()), "se": se, "se_items": se_items, "per_seed": per_seed.tolist(),
           "seed_min": float(per_seed.min()), "seed_max": float(per_seed.max())}
    if base is not None:
        d = values - base
        out["delta"] = float(d.mean())
        out["delta_se"], out["delta_se_items"] = se_pair(d)
        out["delta_per_seed"] = d.mean(1).tolist()
    return out


# ---------------------------------------------------------------- the experiment

def score_data(args, out: Path, train_rows, proxy_path: Path, target_rows,
               corrupted: np.ndarray, scorer_eval_rows: list[dict]) -> tuple[dict, dict]:
    """Warm up the scorer model, then loss and LQS scores of every training row (written with histograms)."""
    init = make_tiny_model(out / "scorer_init", "llama", args.scorer_size, seed=SCORER_SEED)
    steps = args.scorer_steps
    clock = time.perf_counter()
    cfg = sft_config(init, proxy_path, out / "scorer", args, steps, SCORER_SEED, args.scorer_rows)
    cfg.optim.lr = args.scorer_lr or args.lr
    scorer_dir = sft(cfg, progress=False)
    info = {"scorer_warmup_s": time.perf_counter() - clock, "scorer_warmup_steps": steps}
    tok, model = load_tokenizer(str(scorer_dir)), load_causal_lm(str(scorer_dir))
    if args.scorer_eval:  # how much arithmetic the scorer knows: a scorer at chance cannot tell a wrong sum
        acc, _ = evaluate(scorer_dir, scorer_eval_rows, args.max_new_tokens)
        info["scorer_heldout_acc"] = float(acc.mean())

    clock = time.perf_counter()
    loss = loss_based_scores(model, tok, train_rows)
    info["loss_scoring_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if args.lqs_scores:  # a scores_lqs.jsonl an earlier run (e.g. --check-only) wrote for these same rows
        lqs = scores_from_file(args.lqs_scores, train_rows)
    else:
        lqs = lqs_for_rows(model, tok, train_rows, target_rows, steps=args.lqs_steps, score_every=10,
                           lr=args.lqs_lr, batch_size=16, seed=SCORER_SEED, params=args.lqs_params,
                           first_denominator=args.lqs_denominator)
    info["lqs_scoring_s"] = time.perf_counter() - clock
    for name, s in (("loss", loss), ("lqs", lqs)):
        write_scores(out / f"scores_{name}.jsonl", s, train_rows)
    if corrupted.any():
        # the check before any order is compared: a useful score ranks wrong targets as low value
        # (LQS: low score; loss: high loss, so its "value" is the negated loss)
        clean = ~corrupted
        info["quality_check"] = {"corrupted_rows": int(corrupted.sum()),
                                 "lqs_auc": auc(lqs[clean], lqs[corrupted]),
                                 "loss_auc": auc(-loss[clean], -loss[corrupted]),
                                 "pass_at": args.quality_auc}
        info["quality_check"]["lqs_pass"] = info["quality_check"]["lqs_auc"] >= args.quality_auc
        for name, s in (("lqs", lqs), ("-loss", -loss)):  # what a top-80 % selection drops
            dropped = np.setdiff1d(np.arange(len(s)), apply_efficacy(s, "top_ratio", "none", ratio=0.8))
            info["quality_check"][f"{name}_bottom20_corrupted_share"] = float(corrupted[dropped].mean())

    levels = args.levels
    level = np.asarray([levels.index(r["difficulty"]) for r in train_rows])
    lengths = np.asarray([len(ids) for ids, _ in answer_samples(tok, train_rows)])
    info["spearman"] = {"lqs_vs_loss": spearman(lqs, loss), "loss_vs_level": spearman(loss, level),
                        "lqs_vs_level": spearman(lqs, level), "lqs_vs_length": spearman(lqs, lengths),
                        "loss_vs_length": spearman(loss, lengths)}
    info["mean_by_level"] = {lvl: {"loss": float(loss[level == i].mean()), "lqs": float(lqs[level == i].mean())}
                             for i, lvl in enumerate(levels)}
    keep = apply_efficacy(lqs, "top_ratio", "none", ratio=0.8)
    info["lqs_top80_level_share"] = {lvl: float((level[keep] == i).mean()) for i, lvl in enumerate(levels)}
    keep = apply_efficacy(-loss, "top_ratio", "none", ratio=0.8)
    info["-loss_top80_level_share"] = {lvl: float((level[keep] == i).mean()) for i, lvl in enumerate(levels)}

    # Throughput on the scorer itself: the per-sample gradients LQS takes at every scored step.
    sample = samples_from_prompt_lengths(answer_samples(tok, train_rows[:: max(1, len(train_rows) // 64)][:64]))
    info["per_sample_grad_throughput"] = per_sample_grad_throughput(model, sample, chunk_size=16, repeats=3,
                                                                    pad_id=tok.pad_token_id)
    return {"loss": loss, "-loss": -loss, "lqs": lqs}, info


def run(args) -> dict:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    levels = args.levels
    per_level = args.rows // len(levels)
    train_rows = level_rows(levels, per_level, DATA_SEED, "train")
    train_rows, corrupted = corrupt_rows(train_rows, args.corrupt, DATA_SEED, args.corrupt_kind)
    taken = {r["prompt"] for r in train_rows}
    proxy_rows = level_rows(levels, args.scorer_rows // len(levels), PROXY_SEED, "train", taken)
    target_rows = level_rows(levels, args.target_per_level, TARGET_SEED, "train",
                             taken | {r["prompt"] for r in proxy_rows})
    eval_rows = level_rows(levels, args.eval_per_level, EVAL_SEED, "test")
    train_path = write_jsonl(out / "train.jsonl", train_rows)
    proxy_path = write_jsonl(out / "proxy.jsonl", proxy_rows)
    write_jsonl(out / "target.jsonl", target_rows)
    steps = len(train_rows) // args.batch_size  # one pass over D for the all-data runs

    print(f"[efficacy] D = {len(train_rows)} rows ({per_level}/level), {steps} steps x batch {args.batch_size}; "
          f"eval {len(eval_rows)} held-out rows; LQS target {len(target_rows)} rows", flush=True)
    scores, info = score_data(args, out, train_rows, proxy_path, target_rows, corrupted, eval_rows)
    if "quality_check" in info:
        q = info["quality_check"]
        print(f"[efficacy] quality check ({q['corrupted_rows']} rows with wrong targets): LQS ranks clean above "
              f"corrupted with AUC {q['lqs_auc']:.3f}, loss {q['loss_auc']:.3f} (pass at {q['pass_at']}); "
              + ("LQS passes" if q["lqs_pass"] else "LQS FAILS: its orders below are not evidence about DELT")
              + f"; corrupted share of the lowest 20 %: LQS {q['lqs_bottom20_corrupted_share']:.2f}, "
              f"loss {q['-loss_bottom20_corrupted_share']:.2f}", flush=True)
    print(f"[efficacy] scoring: loss {info['loss_scoring_s']:.1f}s, LQS {info['lqs_scoring_s']:.1f}s "
          f"(T={args.lqs_steps}); scorer: {info['scorer_warmup_steps']} warm-up steps, held-out acc "
          f"{info.get('scorer_heldout_acc', float('nan')):.3f}; "
          f"spearman {json.dumps({k: round(v, 3) for k, v in info['spearman'].items()})}", flush=True)
    if args.check_only:
        return {"config": vars(args), "scoring": info, "conditions": {}}

    results = {name: {"acc": [], "nll": [], "acc_by_level": [], "nll_by_level": [], "train_s": []}
               for name, *_ in CONDITIONS}
    level = np.asarray([levels.index(r["difficulty"]) for r in eval_rows])
    for seed in range(args.seeds):
        init = make_tiny_model(out / f"init_{seed}", "llama", args.size, seed=seed)
        scores["random"] = np.random.default_rng(10_000 + seed).random(len(train_rows))
        for name, scorer, select, order_rule, ratio, budget in CONDITIONS:
            order = (None if scorer is None
                     else apply_efficacy(scores[scorer], select, order_rule, ratio=ratio, folds=3, seed=seed))
            run_dir = out / f"run_{seed}"
            clock = time.perf_counter()
            sft(sft_config(init, train_path, run_dir, args, round(steps * budget), seed, len(train_rows),
                           args.min_lr_ratio),
                order=order, progress=False)
            train_s = time.perf_counter() - clock
            acc, nll = evaluate(run_dir, eval_rows, args.max_new_tokens)
            shutil.rmtree(run_dir)
            r = results[name]
            r["acc"].append(acc), r["nll"].append(nll), r["train_s"].append(train_s)
            r["acc_by_level"].append([float(acc[level == i].mean()) for i in range(len(levels))])
            r["nll_by_level"].append([float(nll[level == i].mean()) for i in range(len(levels))])
            print(f"[efficacy] seed {seed} {name:<23} acc {acc.mean():.3f}  nll {nll.mean():.3f}  "
                  f"({train_s:.1f}s train)", flush=True)
        shutil.rmtree(out / f"init_{seed}")

    base_acc, base_nll = np.asarray(results["shuffle"]["acc"]), np.asarray(results["shuffle"]["nll"])
    table = {}
    for name, scorer, select, order_rule, ratio, budget in CONDITIONS:
        r = results[name]
        acc, nll = np.asarray(r["acc"]), np.asarray(r["nll"])
        table[name] = {"scorer": scorer, "select": select, "order": order_rule,
                       "steps": round(steps * budget), "rows_seen": round(steps * budget) * args.batch_size,
                       "distinct_rows": len(train_rows) if select == "all" else int(ratio * len(train_rows) + 1e-9),
                       "accuracy": summary(acc, None if name == "shuffle" else base_acc),
                       "heldout_nll": summary(nll, None if name == "shuffle" else base_nll),
                       "accuracy_by_level": dict(zip(levels, np.asarray(r["acc_by_level"]).mean(0).tolist())),
                       "nll_by_level": dict(zip(levels, np.asarray(r["nll_by_level"]).mean(0).tolist())),
                       "train_s_median": float(np.median(r["train_s"]))}
    return {"config": vars(args) | {"steps": steps, "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                                    "target_rows": len(target_rows), "proxy_rows": len(proxy_rows)},
            "scoring": info, "conditions": table}


# ---------------------------------------------------------------- report

def print_table(res: dict) -> None:
    cfg, info = res["config"], res["scoring"]
    print(f"\nDELT on arithmetic {'+'.join(cfg['levels'])}: {cfg['train_rows']} rows, "
          f"{cfg['steps']} steps x {cfg['batch_size']}, "
          f"tiny llama '{cfg['size']}', {cfg['seeds']} seeds x {cfg['eval_rows']} held-out items")
    head = (f"{'condition':<23}{'acc ± SE':>15}{'seeds':>13}{'Δacc vs shuffle':>18}"
            f"{'NLL ± SE':>15}{'seeds':>13}{'ΔNLL vs shuffle':>18}   acc, NLL {'/'.join(cfg['levels'])}")
    print(head)
    print("-" * len(head))
    for name, row in res["conditions"].items():
        a, n = row["accuracy"], row["heldout_nll"]
        da = f"{a['delta']:+.3f} ± {a['delta_se']:.3f}" if "delta" in a else "—"
        dn = f"{n['delta']:+.3f} ± {n['delta_se']:.3f}" if "delta" in n else "—"
        lv = "/".join(f"{v:.2f}" for v in row["accuracy_by_level"].values())
        lv += "  " + "/".join(f"{v:.2f}" for v in row["nll_by_level"].values())
        print(f"{name:<23}{a['mean']:>8.3f} ± {a['se']:.3f}{a['seed_min']:>7.3f}-{a['seed_max']:.3f}{da:>18}"
              f"{n['mean']:>8.3f} ± {n['se']:.3f}{n['seed_min']:>7.3f}-{n['seed_max']:.3f}{dn:>18}   {lv}")
    t = info["per_sample_grad_throughput"]
    print(f"\nper-sample gradients ({cfg['size']}, 64 samples, chunk 16): "
          f"torch.func vmap {t['vmap_samples_per_s']:.0f} "
          f"samples/s vs Python loop {t['loop_samples_per_s']:.0f} samples/s -> {t['speedup']:.2f}x")
    print(f"scoring time: loss {info['loss_scoring_s']:.1f}s, LQS {info['lqs_scoring_s']:.1f}s "
          f"(T={cfg['lqs_steps']}, scored every 10), scorer warm-up {info['scorer_warmup_s']:.1f}s")
    if "quality_check" in info:
        q = info["quality_check"]
        print(f"quality check: {q['corrupted_rows']} corrupted targets; clean-above-corrupted AUC LQS "
              f"{q['lqs_auc']:.3f}, loss {q['loss_auc']:.3f}; LQS {'passes' if q['lqs_pass'] else 'fails'} "
              f"(≥ {q['pass_at']}); corrupted share of the dropped 20 %: LQS "
              f"{q['lqs_bottom20_corrupted_share']:.2f}, -loss {q['-loss_bottom20_corrupted_share']:.2f}")
    print("score ranks (spearman): " + ", ".join(f"{k} {v:+.2f}" for k, v in info["spearman"].items()))
    print(f"top-80% keeps ({'/'.join(cfg['levels'])} share): LQS "
          + "/".join(f"{v:.2f}" for v in info["lqs_top80_level_share"].values())
          + ", -loss " + "/".join(f"{v:.2f}" for v in info["-loss_top80_level_share"].values()))
    print("paper anchor (160M pretraining, 8-task avg): shuffle 36.37 -> LQS + folding 38.08 (+1.71)")


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(res["conditions"])
    fig = Figure(figsize=(11, 4), dpi=120)
    FigureCanvasAgg(fig)
    for k, (key, label) in enumerate((("accuracy", "held-out accuracy"), ("heldout_nll", "held-out answer NLL"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for i, name in enumerate(names):
            s = res["conditions"][name][key]
            color = "#3b6ea8" if "LQS" in name else "#c0703a" if "loss" in name else "#888888"
            ax.errorbar(i, s["mean"], yerr=s["se"], fmt="o", color=color, capsize=4)
            ax.scatter([i] * len(s["per_seed"]), s["per_seed"], s=10, color=color, alpha=0.5)
        base = res["conditions"]["shuffle"][key]["mean"]
        ax.axhline(base, color="#888888", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{label} (mean ± SE; dots = seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="480 rows, 2 seeds, short LQS proxy run (~1-2 min)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds (init + shuffle); default 3, quick 2")
    p.add_argument("--out", default="runs/bench_efficacy")
    p.add_argument("--rows", type=int, default=None, help="SFT rows in D (equal shares per level); default 4000")
    p.add_argument("--levels", default="tiny,easy", help="arithmetic levels mixed in D and in the eval set")
    p.add_argument("--size", default="nano", choices=["nano", "micro", "mini"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the training runs' cosine decays to lr × this (the paper: 10 %% of the peak); the scorer's "
                        "warm-up decays to 0")
    p.add_argument("--lqs-steps", type=int, default=None, help="LQS proxy-run steps T; default 100 (the paper's), quick 20")
    p.add_argument("--lqs-lr", type=float, default=0.05,
                   help="proxy-run SGD step size (paper: 0.008 at 160M; on nano that run barely moves)")
    p.add_argument("--scorer-rows", type=int, default=None, help="proxy rows that warm the scorer up; default 2000, "
                   "quick 480")
    p.add_argument("--target-per-level", type=int, default=None,
                   help="LQS target-set rows per level; default 128, quick 16")
    p.add_argument("--eval-per-level", type=int, default=None, help="held-out rows per level; default 100, quick 40")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--corrupt", type=float, default=0.2,
                   help="share of training rows given a wrong target (the quality axis LQS must find); 0 = none")
    p.add_argument("--quality-auc", type=float, default=0.75,
                   help="LQS must rank clean rows above corrupted ones with at least this AUC")
    p.add_argument("--corrupt-kind", default="swap", choices=CORRUPT_KINDS,
                   help="shift: result moved by 1-5; swap: another row's solution; random_text: the sanity case")
    p.add_argument("--scorer-size", default="nano", choices=["nano", "micro", "mini"], help="scorer model size")
    p.add_argument("--scorer-steps", type=int, default=None,
                   help="scorer warm-up SFT steps on the proxy rows (cycled); default 300, quick 100")
    p.add_argument("--scorer-lr", type=float, default=None, help="scorer warm-up lr; default --lr")
    p.add_argument("--scorer-eval", action="store_true", help="report the scorer's held-out accuracy")
    p.add_argument("--lqs-params", default=None,
                   help="comma-separated parameter-name prefixes LQS differentiates (default: all)")
    p.add_argument("--lqs-denominator", default="one", choices=["one", "final_norm"],
                   help="last scored term's denominator (lqs_scores first_denominator)")
    p.add_argument("--check-only", action="store_true", help="score and run the quality check, then stop")
    p.add_argument("--lqs-scores", default=None,
                   help="reuse the scores_lqs.jsonl of an earlier run on the same data instead of recomputing LQS "
                        "(its timing then reads as the load time)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a loaded 2-core box)")
    args = p.parse_args()
    quick = args.quick
    args.seeds = args.seeds or (2 if quick else 3)
    args.rows = args.rows or (480 if quick else 4000)
    args.levels = [lvl.strip() for lvl in args.levels.split(",") if lvl.strip()]
    args.lqs_steps = args.lqs_steps or (20 if quick else 100)
    args.eval_per_level = args.eval_per_level or (40 if quick else 100)
    args.scorer_rows = args.scorer_rows or (480 if quick else 2000)
    args.scorer_steps = args.scorer_steps or (100 if quick else 300)
    args.target_per_level = args.target_per_level or (16 if quick else 128)
    args.lqs_params = [x.strip() for x in args.lqs_params.split(",") if x.strip()] if args.lqs_params else None
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    load = os.getloadavg()
    clock = time.perf_counter()
    res = run(args)
    res["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                      "cpus": os.cpu_count(), "loadavg_start": load, "loadavg_end": os.getloadavg(),
                      "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                      "wall_s": time.perf_counter() - clock}
    out = Path(args.out)
    if args.check_only:
        (out / "results.json").write_text(json.dumps(res, indent=2))
        print(f"[efficacy] check only: {res['machine']['wall_s']:.0f}s wall; wrote {out / 'results.json'}")
        return
    print_table(res)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "efficacy.png")
    print(f"\n[efficacy] {res['machine']['wall_s']:.0f}s wall, "
          f"load {load[0]:.1f} -> {res['machine']['loadavg_end'][0]:.1f}; "
          f"wrote {out / 'results.json'}, {out / 'efficacy.png'}, score histograms {out}/scores_*.png")


if __name__ == "__main__":
    main()
