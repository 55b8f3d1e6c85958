"""One sampler decode step: transformers' forward (HFDecode) against FastDecode, same rows and cache.

    python bench/decode.py                       # micro and small Llama, 16 prompts × 2 samples
    python bench/decode.py --rows 16 8 --sizes micro small mini --threads 1

Prints the median process CPU time per decode step of each path and their ratio, from alternating
repeats in one process (CPU time, so that waiting for a shared core does not count).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_path(name: str, model, prompt_ids, prompt_mask, n: int, steps: int) -> float:
    from bridgerl.rollout.decode import FastDecode, HFDecode

    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache = out.past_key_values
        if name == "fast":
            decoder = FastDecode(model, cache, prompt_mask, steps + 1, repeat=n)
        else:
            cache.batch_repeat_interleave(n)
            decoder = HFDecode(model, cache, prompt_mask.repeat_interleave(n, 0))
        nxt = positions[:, -1].repeat_interleave(n) + 1
        tok = torch.randint(2, model.config.vocab_size, (len(prompt_ids) * n,))
        start = time.process_time()
        for _ in range(steps):
            decoder.step(tok, nxt)
            nxt = nxt + 1
        return (time.process_time() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["micro", "small"])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--rows", type=int, nargs=2, default=[16, 2], metavar=("PROMPTS", "SAMPLES"))
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from bridgerl.models import tiny_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    U, n = args.rows
    print(f"torch {torch.__version__}, {args.threads} thread(s); {U} prompts × {n} samples, "
          f"{args.prompt_len}-token prompts (a quarter left-padded), {args.steps} decode steps")
    print(f"{'model':<14} {'params':>8} {'HF ms/step':>11} {'fast ms/step':>13} {'fast / HF':>10}")
    for size in args.sizes:
        model = AutoModelForCausalLM.from_config(tiny_config(args.arch, size)).eval()
        ids = torch.randint(2, model.config.vocab_size, (U, args.prompt_len))
        mask = torch.ones_like(ids)
        mask[: U // 4, : args.prompt_len // 6] = 0
        times: dict[str, list[float]] = {"hf": [], "fast": []}
        for _ in range(args.repeats):  # alternate, so load drifts hit both alike
            for name in times:
                times[name].append(time_path(name, model, ids, mask, n, args.steps))
        hf, fast = (statistics.median(times[k]) * 1e3 for k in ("hf", "fast"))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{args.arch + '/' + size:<14} {params:>7.2f}M {hf:>11.3f} {fast:>13.3f} {fast / hf:>10.2f}")


if __name__ == "__main__":
    main()
