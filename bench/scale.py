"""Scale-out costs and gains: generation with K Ray workers, the trainer on N FSDP2 ranks, startup.

    python bench/scale.py                                   # CPU: tiny micro Llama, 1 vs 2 workers / ranks
    python bench/scale.py --model runs/seed --prompts 64 --max-new-tokens 128   # any HF folder
    python bench/scale.py --device cuda                     # GPU: ranks use NCCL (needs N GPUs for N ranks)

Measures (wall-clock; medians over --repeats after one warm-up):
  startup      Ray init, actor creation per pool, first and second weight push (object store)
  generation   tokens/s of the in-process engine and of pools of 1..K workers, same prompts and seeds
               (the pool's rollouts are checked equal to the in-process engine's)
  trainer      seconds per GRPO update on fixed rollouts, 1 process vs N gloo/NCCL ranks (FSDP2)
Results go to --out (JSON) and are printed as a table. Every process uses one torch thread on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _tiny_model(size: str) -> str:
    from bridgerl.models import build_tokenizer, make_tiny_model

    path = Path(tempfile.mkdtemp(prefix="bridgerl-scale-")) / f"llama-{size}"
    make_tiny_model(path, "llama", size, seed=0, tokenizer=build_tokenizer())
    return str(path)


def _prompts(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i} + {3 * i}? Show the steps."}],
                                          add_generation_prompt=True, return_dict=False) for i in range(count)]


def _timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_generation(model_path: str, workers: list[int], args) -> dict:
    from bridgerl.config import RolloutConfig
    from bridgerl.models import load_causal_lm, load_tokenizer
    from bridgerl.rollout.hf import HFGenerator
    from bridgerl.rollout.workers import RayGeneratorPool

    tok = load_tokenizer(model_path)
    policy = load_causal_lm(model_path)
    prompts = _prompts(tok, args.prompts)
    sampling = RolloutConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    engine = HFGenerator(policy, tok, per_prompt_seeds=True)
    sec, ref = _timed(lambda: engine.generate(prompts, args.n, sampling, torch.Generator().manual_seed(0)),
                      args.repeats)
    tokens = int(ref.completion_mask.sum())
    out = {"tokens_per_step": tokens, "in_process": {"s": sec, "tokens_per_s": tokens / sec}, "startup": {}}
    for k in workers:
        pool = RayGeneratorPool(policy, tok, workers=k, num_cpus=max(workers))
        start = time.perf_counter()
        pool.load_weights(policy, 1)
        first_push = time.perf_counter() - start
        start = time.perf_counter()
        pool.load_weights(policy, 2)
        second_push = time.perf_counter() - start
        engine.load_weights(policy, 2)
        sec, got = _timed(lambda: pool.generate(prompts, args.n, sampling, torch.Generator().manual_seed(0)),
                          args.repeats)
        ref2 = engine.generate(prompts, args.n, sampling, torch.Generator().manual_seed(0))
        out[f"workers_{k}"] = {"s": sec, "tokens_per_s": tokens / sec,
                               "same_as_in_process": bool(torch.equal(got.completion_ids, ref2.completion_ids))}
        out["startup"][f"workers_{k}"] = pool.startup | {"first_push_s": first_push, "second_push_s": second_push}
        pool.close()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _update_setup(model_path: str, rollouts_path: str):
    from bridgerl.config import GRPOConfig
    from bridgerl.models import frozen_copy, load_causal_lm

    batch, rewards = torch.load(rollouts_path, weights_only=False)
    policy = load_causal_lm(model_path)
    if torch.cuda.is_available() and os.environ.get("BENCH_DEVICE") == "cuda":
        policy, batch, rewards = policy.cuda(), batch.to("cuda"), rewards.cuda()
    return policy, frozen_copy(policy), batch, rewards, GRPOConfig(beta=0.01)


def _update(policy, reference, optimizer, batch, rewards, algo, micro: int) -> dict:
    """One step of the loop's own accumulation (train/loop.update_policy) on fixed rollouts."""
    from types import SimpleNamespace

    from bridgerl.algos.objective import BatchContext
    from bridgerl.algos.registry import build_objective
    from bridgerl.rollout.logprobs import ReferenceLogprobs
    from bridgerl.train.loop import update_policy

    objective = build_objective(algo)
    ctx = BatchContext(binary=torch.zeros(rewards.shape[0], dtype=torch.bool), policy_version=0, micro_batch=micro,
                       reference=ReferenceLogprobs(reference, batch, micro, False))
    run = SimpleNamespace(objective=objective, train_policy=policy, policy=policy, optimizer=optimizer, step=0,
                          scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                          cfg=SimpleNamespace(optim=SimpleNamespace(grad_clip=1.0)))
    return update_policy(run, objective.make_batch(batch, rewards, ctx))


def _rank_main(rank: int, world: int, port: int, model_path: str, rollouts_path: str, micro: int, repeats: int,
               result: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from bridgerl.distributed.fsdp import init_distributed, shard_model, shutdown

    start = time.perf_counter()
    init_distributed()
    policy, reference, batch, rewards, algo = _update_setup(model_path, rollouts_path)
    shard_model(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    setup_s = time.perf_counter() - start
    sec, _ = _timed(lambda: _update(policy, reference, optimizer, batch, rewards, algo, micro), repeats)
    if rank == 0:
        Path(result).write_text(json.dumps({"s_per_update": sec, "setup_s": setup_s}))
    shutdown()


def bench_trainer(model_path: str, nprocs: list[int], args) -> dict:
    import torch.multiprocessing as mp

    from bridgerl.config import RolloutConfig
    from bridgerl.models import load_causal_lm, load_tokenizer
    from bridgerl.rollout.hf import HFGenerator

    tok = load_tokenizer(model_path)
    policy = load_causal_lm(model_path)
    batch = HFGenerator(policy, tok).generate(_prompts(tok, args.prompts), args.n,
                                              RolloutConfig(n=args.n, max_new_tokens=args.max_new_tokens),
                                              torch.Generator().manual_seed(0))
    rewards = torch.rand((args.prompts, args.n), generator=torch.Generator().manual_seed(1))
    work = Path(tempfile.mkdtemp(prefix="bridgerl-scale-train-"))
    torch.save((batch, rewards), work / "rollouts.pt")
    out = {"rows": args.prompts * args.n, "micro_batch": args.micro_batch}
    for n in nprocs:
        if n == 1:
            policy, reference, b, r, algo = _update_setup(model_path, str(work / "rollouts.pt"))
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
            sec, _ = _timed(lambda: _update(policy, reference, optimizer, b, r, algo, args.micro_batch), args.repeats)
            out["nproc_1"] = {"s_per_update": sec}
            continue
        result = work / f"nproc-{n}.json"
        start = time.perf_counter()
        mp.spawn(_rank_main, args=(n, _free_port(), model_path, str(work / "rollouts.pt"), args.micro_batch,
                                   args.repeats, str(result)), nprocs=n)
        out[f"nproc_{n}"] = json.loads(result.read_text()) | {"spawn_total_s": time.perf_counter() - start}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder (default: a fresh tiny Llama of --size)")
    p.add_argument("--size", default="micro")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--skip", nargs="*", default=[], choices=["generation", "trainer"])
    p.add_argument("--out", default="bench/results/scale/results.json")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    os.environ["BENCH_DEVICE"] = args.device
    model_path = args.model or _tiny_model(args.size)
    results = {"model": args.model or f"tiny llama {args.size}", "device": args.device, "argv": sys.argv[1:],
               "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if "generation" not in args.skip:
        results["generation"] = bench_generation(model_path, args.workers, args)
    if "trainer" not in args.skip:
        results["trainer"] = bench_trainer(model_path, args.nproc, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
