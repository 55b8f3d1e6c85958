"""Sampling throughput of bridgerl's HF engine against vLLM (in-process), same prompts and settings.

    python bench/engines.py                                   # CPU: tiny mini and small Llama
    python bench/engines.py --sizes small --prompts 32 --n 8 --max-new-tokens 64
    python bench/engines.py --model /path/to/hf-folder --device cuda --dtype bfloat16 \\
        --prompts 64 --n 8 --max-new-tokens 256 --no-enforce-eager --gpu-memory-utilization 0.5   # GPU, < 10 min

Needs vLLM in the environment (on CPU: the .ci/vllm venv). Each engine samples the same token
prompts (n samples each, temperature 1, EOS allowed) after one warm-up call; the table gives the
median wall-clock generated tokens per second over --repeats calls, and the time of one verified
weight push (rollout/sync.py) into vLLM. One engine runs at a time, in one process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def timed_generate(gen, prompts, n, sampling, repeats: int, device: str) -> tuple[float, float]:
    """(median generated tokens/s, median seconds per call) after one warm-up call."""
    gen.generate(prompts, n, sampling, torch.Generator(device=device).manual_seed(0))
    rates, secs = [], []
    for r in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = gen.generate(prompts, n, sampling, torch.Generator(device=device).manual_seed(r + 1))
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - start
        rates.append(out.lengths.sum().item() / dt)
        secs.append(dt)
    return statistics.median(rates), statistics.median(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["mini", "small"], help="tiny Llama sizes (models.py)")
    ap.add_argument("--model", help="an HF model folder instead of tiny models")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--no-enforce-eager", action="store_true", help="GPU: let vLLM capture CUDA graphs")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's own limit")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from bridgerl.config import SamplingConfig, VLLMEngineConfig
    from bridgerl.models import build_tokenizer, load_causal_lm, load_tokenizer, make_tiny_model
    from bridgerl.rollout.hf import HFGenerator
    from bridgerl.rollout.sync import probe_sequences, push_weights

    if args.model:
        models = [(Path(args.model).name, args.model)]
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
        tok = build_tokenizer()
        models = [(f"llama-{s}", str(make_tiny_model(tmp / s, "llama", s, tokenizer=tok))) for s in args.sizes]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
    rows = []
    for name, path in models:
        tokenizer = load_tokenizer(path)
        policy = load_causal_lm(path, args.dtype, device=torch.device(args.device))
        g = torch.Generator().manual_seed(0)
        vocab = min(len(tokenizer), policy.config.vocab_size)
        prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        params = sum(p.numel() for p in policy.parameters())
        result = {"model": name, "params": params}
        if "vllm" in args.engines:  # first: vLLM sets the process's thread count, HF then uses the same
            from bridgerl.rollout.vllm import VLLMGenerator

            start = time.perf_counter()
            opts = VLLMEngineConfig(max_model_len=args.max_model_len, enforce_eager=not args.no_enforce_eager,
                                    gpu_memory_utilization=args.gpu_memory_utilization)
            vgen = VLLMGenerator(path, tokenizer, opts, dtype=args.dtype)
            result["vllm_start_s"] = time.perf_counter() - start
            result["threads"] = torch.get_num_threads()  # vLLM's CPU worker binds the process's OpenMP threads
            result["vllm_tok_s"], result["vllm_call_s"] = timed_generate(vgen, prompts, args.n, sampling,
                                                                         args.repeats, args.device)
            tol = 1e-3 if args.dtype == "float32" else 0.2
            m = push_weights(vgen, policy, 1, 600, probe_sequences(vocab), tolerance=tol)
            result["push_s"], result["push_diff"] = m["time/sync_verified"], m["sync/max_logprob_diff"]
            vgen.close()
            del vgen
        if "hf" in args.engines:
            hgen = HFGenerator(policy, tokenizer)
            result["hf_tok_s"], result["hf_call_s"] = timed_generate(hgen, prompts, args.n, sampling, args.repeats,
                                                                     args.device)
            del hgen
        rows.append(result)

    threads = rows[0].get("threads", torch.get_num_threads()) if rows else torch.get_num_threads()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} thread(s) for both engines"
    print(f"\n{dev}; torch {torch.__version__}; {args.dtype}; {args.prompts} prompts × {args.n} samples, "
          f"{args.prompt_len}-token prompts, ≤ {args.max_new_tokens} new tokens, T=1; median of {args.repeats}")
    print("| model | params | HF tok/s | vLLM tok/s | vLLM / HF | vLLM start s | verified push s (max Δlogp) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hf, vl = r.get("hf_tok_s"), r.get("vllm_tok_s")
        ratio = f"{vl / hf:.2f}" if hf and vl else "-"
        push = f"{r['push_s']:.2f} ({r['push_diff']:.1e})" if "push_s" in r else "-"
        print(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {hf or 0:.0f} | {vl or 0:.0f} | {ratio} | "
              f"{r.get('vllm_start_s', 0):.1f} | {push} |")


if __name__ == "__main__":
    main()
