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
  bridgerl tiny OUT_DIR [--arch llama] [--size micro] build a tiny model + tokenizer folder (offline)

Every config key can be overridden on the command line, e.g. rollout.sync_every=10 algo.beta=0.1.
Run `bridgerl COMMAND --help` for the options of each command.
"""


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def cmd_train(args) -> int:
    from .config import ConfigError, load_config
    from .train.loop import train

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"bridgerl train: {err}", file=sys.stderr)
        return 2
    if args.out:
        cfg.train.out_dir = args.out
    _quiet_transformers()
    run = train(cfg, resume=args.resume)
    print(f"[bridgerl] done: {run.step} steps; metrics in {run.out_dir / 'metrics.jsonl'}")
    return 0


def cmd_eval(args) -> int:
    from .config import load_config
    from .train.evaluate import evaluate
    from .train.setup import build_run

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
    from .config import ConfigError, SFTConfig, load_typed
    from .train.sft import sft

    try:
        cfg = load_typed(SFTConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"bridgerl sft: {err}", file=sys.stderr)
        return 2
    _quiet_transformers()
    print(f"[bridgerl] fine-tuned model written to {sft(cfg)}")
    return 0


def cmd_rm(args) -> int:
    from .config import ConfigError, RMConfig, load_typed
    from .train.sft import train_reward_model

    try:
        cfg = load_typed(RMConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"bridgerl rm: {err}", file=sys.stderr)
        return 2
    _quiet_transformers()
    path, metrics = train_reward_model(cfg)
    print(f"[bridgerl] reward model written to {path}; held-out pair accuracy {metrics['rm/heldout_accuracy']:.3f}")
    return 0


def cmd_tiny(args) -> int:
    from .models import make_tiny_model

    _quiet_transformers()
    path = make_tiny_model(args.out_dir, args.arch, args.size, seed=args.seed)
    print(f"[bridgerl] tiny {args.arch}/{args.size} model written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridgerl", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a policy from a YAML config",
                       description="Train a policy. Overrides look like rollout.sync_every=10.")
    p.add_argument("config", help="YAML config file (see examples/)")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--out", help="run folder (overrides train.out_dir)")
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

    p = sub.add_parser("tiny", help="write a tiny model + tokenizer folder (no download)")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "olmoe", "qwen2_moe"])
    p.add_argument("--size", default="micro", help="nano, micro, mini (and small for dense)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) == "-":
        args.config = None
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
