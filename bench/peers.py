"""bridgerl against TRL on the same work, step by step in one process (issue 8).

For each model size and objective, one bridgerl run and one TRL run (`trl.GRPOTrainer`, or
`trl.experimental.online_dpo.OnlineDPOTrainer`) start from the same saved model folder and take
turns: TRL's own `Trainer.train()` loop runs, and at each of its step ends a callback runs one
bridgerl `train_step`, so both sides meet the same machine load. Both are served the same prompts
in the same order and share group size, max new tokens, temperature, learning rate, β, clip, loss
aggregation, optimizer and reward (bridgerl's Math-Verify `math_reward`); neither logs nor
checkpoints. docs/speed.md lists every setting. Afterwards both policies are scored greedily on
the same held-out prompts, and (`--memory`) each side's peak memory is taken in a fresh process.

The model is a tiny Llama from `bridgerl.models.make_tiny_model`, briefly fine-tuned (bridgerl's
SFT) on `arithmetic:tiny` so that sampled answers are right about half the time and groups carry
signal, as in real use. The folders are built once and cached (`--cache-dir`).

    python bench/peers.py                          # micro and small, GRPO and online DPO, CPU fp32
    python bench/peers.py --quick                  # smoke run: micro model, 4 steps
    python bench/peers.py --device cuda --dtype bf16
    python bench/peers.py --dtype amp-bf16             # fp32 weights, bf16 autocast (mixed precision) on both sides
    python bench/peers.py --check --threshold 0.6  # exit 1 if a bridgerl/TRL step-time ratio > 0.6

On CPU the ratio is taken on process CPU time with one torch thread (`--threads`): on a machine
shared with other jobs, wall time also counts waiting for a core, and several OpenMP threads on
two busy cores spin against each other. Wall-time ratios are printed too. On CUDA: wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TASK = "arithmetic:tiny"
DEFAULT_LR = 5e-5
# One-off SFT per size: enough that about half of the sampled answers are right.
SFT = {"nano": dict(steps=300, lr=3e-3, batch_size=32), "micro": dict(steps=300, lr=3e-3, batch_size=32),
       "mini": dict(steps=300, lr=3e-3, batch_size=32), "small": dict(steps=300, lr=2e-3, batch_size=16)}


# ---- models and settings ----------------------------------------------------------------------

def prepared_model(size: str, cache_dir: Path) -> Path:
    """A tiny Llama of `size`, fine-tuned briefly on the task; built once and cached."""
    from bridgerl.config import SFTConfig
    from bridgerl.models import make_tiny_model
    from bridgerl.supervised.sft import sft

    s = SFT[size]
    out = cache_dir / f"llama-{size}-{TASK.replace(':', '-')}-sft{s['steps']}"
    if (out / "config.json").exists():
        return out
    base = make_tiny_model(cache_dir / f"llama-{size}-base", "llama", size, seed=0)
    print(f"[peers] preparing {out.name} (one-off SFT, {s['steps']} steps)", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    cfg = SFTConfig(model={"path": str(base)}, data={"train": f"builtin:{TASK}"}, steps=s["steps"],
                    batch_size=s["batch_size"], optim={"lr": s["lr"], "schedule": "cosine", "warmup_steps": 10},
                    out_dir=str(tmp), device="cpu")
    sft(cfg, progress=False)
    tmp.rename(out)
    return out


@dataclass
class Work:
    """One side-by-side comparison: everything both libraries must agree on."""
    algo: str  # grpo | dpo
    model: str  # prepared model folder
    steps: int
    prompts: int  # prompts per step
    n: int  # completions per prompt (online DPO: 2, as TRL fixes it)
    max_new_tokens: int
    temperature: float
    lr: float
    beta: float
    clip_eps: float = 0.2
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    mixed: bool = False  # fp32 weights, bf16 autocast (bridgerl train.mixed_precision, TRL bf16=True)
    eval_prompts: int = 128

    @property
    def completions(self) -> int:
        return self.prompts * self.n


def bridgerl_config(w: Work, out_dir: str):
    from bridgerl.config import Config

    algo = ({"name": "grpo", "beta": w.beta, "aggregation": "token_mean", "normalize_std": True,
             "importance": "clip", "clip_eps": w.clip_eps, "updates_per_batch": 1}
            if w.algo == "grpo" else
            {"name": "dpo", "beta": w.beta, "reduction": "mean", "length_normalize": False, "pairs": "auto"})
    return Config.model_validate({
        "model": {"path": w.model, "dtype": w.dtype},
        "algo": algo,
        "rollout": {"n": w.n, "max_new_tokens": w.max_new_tokens, "temperature": w.temperature, "top_p": 1.0,
                    "top_k": 0, "sync_every": 1, "batch_size": max(256, w.completions)},
        "data": {"train": f"builtin:{TASK}", "num_train": 2000, "num_eval": w.eval_prompts,
                 "prompts_per_step": w.prompts},
        # Rewards in-process, as TRL scores them: worker processes' CPU time would not show in
        # process_time(), which would flatter bridgerl's ratio.
        "rewards": {"processes": 0},
        "optim": {"lr": w.lr, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "grad_clip": w.grad_clip},
        "train": {"steps": w.steps, "seed": w.seed, "out_dir": out_dir, "device": w.device,
                  "micro_batch": w.completions, "checkpoint_every": 0, "save_final": False,
                  "mixed_precision": "bf16" if w.mixed else "no"},
        "eval": {"at_start": False, "every": 0, "max_new_tokens": w.max_new_tokens, "max_prompts": w.eval_prompts},
        "log": {"tensorboard": False, "wandb": False, "progress": False},
    })


def trl_args(w: Work, out_dir: str):
    """TRL settings that make its step the same work as bridgerl's (docs/speed.md lists each)."""
    common = dict(
        output_dir=out_dir, seed=w.seed, learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=w.grad_clip,
        max_steps=w.steps, gradient_accumulation_steps=1, temperature=w.temperature, top_p=1.0, top_k=0,
        # TRL turns activation checkpointing on by default (it recomputes the forward in the backward, and
        # online DPO then samples without a KV cache); bridgerl does neither, so it is off here.
        gradient_checkpointing=False,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=w.device == "cpu", bf16=w.dtype == "bfloat16" or w.mixed,
        remove_unused_columns=False,
    )
    if w.algo == "grpo":
        from trl import GRPOConfig
        return GRPOConfig(
            **common,
            per_device_train_batch_size=w.completions,  # TRL counts completions, not prompts
            generation_batch_size=w.completions,  # one generation per optimizer step
            num_generations=w.n, max_completion_length=w.max_new_tokens, beta=w.beta, num_iterations=1,
            epsilon=w.clip_eps, loss_type="dapo",  # token mean over the batch == bridgerl token_mean
            scale_rewards="group", use_bias_correction_kl=False,  # plain k3 KL, as bridgerl
            mask_truncated_completions=False, shuffle_dataset=False, log_completions=False,
        )
    from trl.experimental.online_dpo import OnlineDPOConfig
    return OnlineDPOConfig(
        **common, per_device_train_batch_size=w.prompts, max_new_tokens=w.max_new_tokens, beta=w.beta,
        loss_type="sigmoid", missing_eos_penalty=None, max_length=4096, train_sampling_strategy="sequential",
    )


def step_rows(w: Work) -> list[dict]:
    """The prompts bridgerl's stream will serve, in order, so TRL (sequential sampling) gets the same."""
    from bridgerl.data.stream import PromptStream
    from bridgerl.train.run import build_rows

    train, _ = build_rows(bridgerl_config(w, tempfile.gettempdir()))
    stream = PromptStream(train, w.prompts, seed=w.seed)
    return [r for _ in range(w.steps) for r in stream.next_batch()]


def make_bridgerl(w: Work, out_dir: str):
    from bridgerl.train.run import build_run
    return build_run(bridgerl_config(w, out_dir))


def make_trl(w: Work, out_dir: str, reward_fn):
    """TRL's trainer on the prompts bridgerl will see, in the same order."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    from bridgerl.models import DTYPES, load_tokenizer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in step_rows(w)])
    tokenizer = load_tokenizer(w.model)
    model = AutoModelForCausalLM.from_pretrained(w.model, dtype=DTYPES[w.dtype]).to(w.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl_args(w, out_dir)
        if w.algo == "grpo":
            from trl import GRPOTrainer as Trainer
        else:
            from trl.experimental.online_dpo import OnlineDPOTrainer as Trainer
        trainer = Trainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
    return trainer


def completion_tokens(ids: list[int], eos: set[int]) -> int:
    """Tokens up to and including the first EOS: what bridgerl counts as generated."""
    for i, t in enumerate(ids):
        if t in eos:
            return i + 1
    return len(ids)


def trl_reward(w: Work, eos: set[int], log: dict):
    """bridgerl's math_reward in TRL's signature; it also records what TRL generated."""
    from bridgerl.rewards.math import math_reward

    def reward(prompts, completions, completion_ids=None, answer=None, **kwargs):
        log["prompts"].append(sorted({p[-1]["content"] for p in prompts}))
        log["completions"].append(len(completions))
        log["tokens"].append(sum(completion_tokens(list(ids), eos) for ids in completion_ids))
        scores = math_reward(completions, answer=answer)
        log["reward"].append(sum(scores) / max(1, len(scores)))
        return scores
    reward.__name__ = "math_reward"
    return reward


# ---- measurement ------------------------------------------------------------------------------

def now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class Clock:
    """Wall time and process CPU time. On a CPU shared with other jobs the wall clock also counts
    the time this process waited for a core; CPU time (all threads: the reward's worker threads
    too) does not, so with one torch thread it is the steadier measure of the work done."""

    def __init__(self, device: str):
        self.device = device
        self.mark()

    def mark(self) -> None:
        self.wall, self.cpu = now(self.device), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = now(self.device), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


@dataclass
class Side:
    wall: list[float] = field(default_factory=list)  # seconds per step
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per step
    tokens: list[float] = field(default_factory=list)  # completion tokens generated per step
    completions: list[int] = field(default_factory=list)
    trained: list[float] = field(default_factory=list)  # share of generated tokens that carried gradient
    reward: list[float] = field(default_factory=list)  # mean training reward per step (same prompts both sides)
    state_mb: float = math.nan
    peak_mb: float = math.nan
    heldout: tuple[float, float] = (math.nan, math.nan)


def state_mb(models: list, optimizer) -> float:
    """Resident training state: every model copy a side keeps, plus optimizer moments."""
    seen, total = set(), 0
    for m in models:
        for t in (list(m.parameters()) + list(m.buffers())) if m is not None else []:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    for s in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return total / 2**20


def heldout(model, tokenizer, rows: list[dict], max_new_tokens: int) -> tuple[float, float]:
    """Greedy accuracy (mean, standard error) on held-out prompts, one generator for both sides."""
    from bridgerl.config import SamplingConfig
    from bridgerl.rewards.math import math_reward
    from bridgerl.rollout.hf import HFGenerator

    gen = HFGenerator(model, tokenizer, share_weights=True)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             return_dict=False) for r in rows]
    out = gen.generate(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    scores = torch.tensor(math_reward(out.completions, answer=[r["answer"] for r in rows]))
    return scores.mean().item(), (scores.std().item() / math.sqrt(len(scores)) if len(scores) > 1 else 0.0)


def compare(w: Work, skip: int = 1) -> tuple[Side, Side]:
    """Run bridgerl and TRL alternately on `w` → (bridgerl, TRL) per-step measurements."""
    from transformers import TrainerCallback

    from bridgerl.train.loop import train_step

    tmp = tempfile.mkdtemp(prefix="peers-")
    run = make_bridgerl(w, tmp + "/bridgerl")
    log = {"prompts": [], "completions": [], "tokens": [], "reward": []}
    trainer = make_trl(w, tmp + "/trl", trl_reward(w, {run.tokenizer.eos_token_id}, log))
    ours, theirs = Side(), Side()

    class Alternate(TrainerCallback):
        """Close TRL's step, then run one bridgerl step; TRL's clock restarts after it."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.clock = Clock(w.device)

        def on_step_end(self, args, state, control, **kwargs):
            wall, cpu = self.clock.lap()
            theirs.wall.append(wall)
            theirs.cpu.append(cpu)
            self.clock.mark()
            m = train_step(run)
            wall, cpu = self.clock.lap()
            ours.wall.append(wall)
            ours.cpu.append(cpu)
            ours.tokens.append(m["tokens/generated"])
            ours.trained.append(m.get("tokens/trained", 0.0) / max(1.0, m["tokens/generated"]))
            ours.reward.append(m["reward/mean"])
            self.clock.mark()

    trainer.add_callback(Alternate())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    rows = step_rows(w)
    expected = [sorted({r["prompt"] for r in rows[i * w.prompts:(i + 1) * w.prompts]}) for i in range(w.steps)]
    if log["prompts"] != expected:
        raise RuntimeError("TRL was served other prompts than bridgerl; the comparison would not be like for like")
    theirs.tokens, theirs.completions, theirs.reward = log["tokens"], log["completions"], log["reward"]
    ours.completions = [w.completions] * w.steps
    ours.state_mb = state_mb([run.policy, run.reference, run.generator.model], run.optimizer)
    theirs.state_mb = state_mb([trainer.model, getattr(trainer, "ref_model", None)], trainer.optimizer)
    held = run.eval_rows[: w.eval_prompts]
    ours.heldout = heldout(run.policy, run.tokenizer, held, w.max_new_tokens)
    theirs.heldout = heldout(trainer.model, trainer.processing_class, held, w.max_new_tokens)
    return ours, theirs


def peak_memory(w: Work, side: str, steps: int, threads: int) -> float:
    """Peak memory (MB) of a fresh process that builds one side and takes `steps` steps: peak RSS
    on CPU, the allocator's peak on CUDA. Separate processes, so neither side's memory is the other's."""
    spec = json.dumps(asdict(w) | {"steps": steps})
    out = subprocess.run([sys.executable, __file__, "--memory-child", side, spec, "--threads", str(threads)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory run for {side} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(side: str, spec: str) -> None:
    w = Work(**json.loads(spec))
    tmp = tempfile.mkdtemp(prefix="peers-mem-")
    if side == "bridgerl":
        from bridgerl.train.loop import train_step
        run = make_bridgerl(w, tmp)
        for _ in range(w.steps):
            train_step(run)
    else:
        trainer = make_trl(w, tmp, trl_reward(w, set(), {"prompts": [], "completions": [], "tokens": [], "reward": []}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    if w.device == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is not inherited from the
    parent across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def summarise(w: Work, ours: Side, theirs: Side, skip: int) -> dict:
    med = statistics.median
    wall = [a / b for a, b in list(zip(ours.wall, theirs.wall))[skip:]]
    cpu = [a / b for a, b in list(zip(ours.cpu, theirs.cpu))[skip:]]
    ratios = wall if w.device == "cuda" else cpu  # the guarded ratio

    def side(s: Side) -> dict:
        clock = (s.wall if w.device == "cuda" else s.cpu)[skip:]
        return {"wall_s": med(s.wall[skip:]), "cpu_s": med(s.cpu[skip:]), "step_s": med(clock),
                "tokens_per_s": sum(s.tokens[skip:]) / sum(clock), "peak_mb": s.peak_mb, "state_mb": s.state_mb,
                "heldout": s.heldout[0], "heldout_se": s.heldout[1], "completions_per_step": med(s.completions),
                "train_reward": statistics.mean(s.reward), "train_reward_last_half": statistics.mean(s.reward[len(s.reward) // 2:]),
                "wall": s.wall, "cpu": s.cpu, "tokens": s.tokens, "reward": s.reward}

    return {"algo": w.algo, "model": Path(w.model).name, "steps": w.steps, "prompts": w.prompts, "n": w.n,
            "clock": "wall" if w.device == "cuda" else "cpu",
            "ratio": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "wall_ratio": med(wall), "wall_ratio_min": min(wall), "wall_ratio_max": max(wall),
            "trained_fraction": statistics.mean(ours.trained[skip:]),
            "bridgerl": side(ours), "trl": side(theirs)}


# ---- report -----------------------------------------------------------------------------------

def table(results: list[dict], sizes: dict[str, int]) -> str:
    """One row per objective and model; b = bridgerl, T = TRL."""
    clock = results[0]["clock"] if results else "cpu"
    head = (f"| objective | model | {clock} s/step b / T | ratio {clock} (min–max) | wall s/step b / T "
            "| ratio wall (min–max) | tokens/s b / T | peak MB b / T | state MB b / T "
            "| held-out b / T (±se) | train reward b / T | b trained frac |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in results:
        b, t = r["bridgerl"], r["trl"]
        name = "GRPO" if r["algo"] == "grpo" else "online DPO"
        lines.append(
            f"| {name} | {r['model'].split('-')[1]} ({sizes.get(r['model'], 0) / 1e6:.2f} M) "
            f"| {b['step_s']:.3f} / {t['step_s']:.3f} | **{r['ratio']:.2f}** ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) "
            f"| {b['wall_s']:.3f} / {t['wall_s']:.3f} "
            f"| {r['wall_ratio']:.2f} ({r['wall_ratio_min']:.2f}–{r['wall_ratio_max']:.2f}) "
            f"| {b['tokens_per_s']:.0f} / {t['tokens_per_s']:.0f} | {b['peak_mb']:.0f} / {t['peak_mb']:.0f} "
            f"| {b['state_mb']:.1f} / {t['state_mb']:.1f} "
            f"| {b['heldout']:.3f}±{b['heldout_se']:.3f} / {t['heldout']:.3f}±{t['heldout_se']:.3f} "
            f"| {b['train_reward']:.3f} / {t['train_reward']:.3f} | {r['trained_fraction']:.2f} |")
    return "\n".join(lines)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bridgerl", "bench-peers")


def work_for(algo: str, model: Path, args: argparse.Namespace) -> Work:
    grpo = algo == "grpo"
    return Work(algo=algo, model=str(model), steps=args.steps, prompts=args.prompts if grpo else args.dpo_prompts,
                n=args.n if grpo else 2, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                lr=args.lr, beta=args.grpo_beta if grpo else args.dpo_beta, device=args.device,
                dtype={"fp32": "float32", "bf16": "bfloat16", "amp-bf16": "float32"}[args.dtype],
                mixed=args.dtype == "amp-bf16", eval_prompts=args.eval_prompts,
                seed=args.seed)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="micro model only, 4 steps, no memory runs: a smoke run")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per side and configuration")
    p.add_argument("--sizes", default="micro,small", help="tiny-model factory sizes, comma separated")
    p.add_argument("--algos", default="grpo,dpo")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "amp-bf16"],
                   help="bf16: bf16 weights on both sides; amp-bf16: fp32 weights with bf16 autocast on both sides")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    p.add_argument("--n", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--dpo-prompts", type=int, default=16, help="online DPO prompts per step (2 completions each)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--grpo-beta", type=float, default=0.04)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="data order, sampling and held-out split")
    p.add_argument("--skip", type=int, default=1, help="warm-up steps left out of the medians")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of each side's memory run; 0: no memory runs")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="prepared model folders")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--check", action="store_true", help="exit 1 if any median ratio is above --threshold")
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--memory-child", nargs=2, metavar=("SIDE", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.eval_prompts, args.memory_steps = "micro", 4, 32, 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    return args


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    quiet_transformers()
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    results, sizes = [], {}
    load = os.getloadavg()
    started = time.perf_counter()
    for size in args.sizes.split(","):
        model = prepared_model(size, cache)
        from transformers import AutoModelForCausalLM
        sizes[model.name] = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        for algo in args.algos.split(","):
            w = work_for(algo, model, args)
            t0 = time.perf_counter()
            ours, theirs = compare(w, skip=args.skip)
            if args.memory_steps:
                ours.peak_mb = peak_memory(w, "bridgerl", args.memory_steps, args.threads)
                theirs.peak_mb = peak_memory(w, "trl", args.memory_steps, args.threads)
            r = summarise(w, ours, theirs, args.skip)
            results.append(r)
            print(f"[peers] {algo} {size}: ratio {r['ratio']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}), "
                  f"bridgerl {r['bridgerl']['step_s']:.3f}s, TRL {r['trl']['step_s']:.3f}s "
                  f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    print(f"\ndevice: {device}, dtype {args.dtype}; load average at start {load[0]:.2f} / end {os.getloadavg()[0]:.2f}; "
          f"{args.steps} steps per side, first {args.skip} left out; wall {time.perf_counter() - started:.0f}s")
    print(table(results, sizes))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "dtype": args.dtype, "load": load,
                                               "args": vars(args), "results": results}, indent=1, default=str))
    if args.check:
        bad = [r for r in results if r["ratio"] > args.threshold]
        for r in bad:
            print(f"[peers] CHECK FAILED: {r['algo']} {r['model']}: ratio {r['ratio']:.2f} > {args.threshold}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
