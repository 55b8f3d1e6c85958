"""Ray workers: a local cluster (num_cpus=2) with 2 generator actors gives the in-process engine's
rollouts for the same seeds and weights, survives a worker killed mid-step, and reward actors give
the router's scores. Uses the real HF engine and real Ray actors on a tiny model."""
import functools
import os
import signal
import threading
import time

import psutil
import pytest
import torch

from bridgerl.config import RolloutConfig
from bridgerl.models import load_causal_lm
from bridgerl.rollout.hf import HFGenerator

ray = pytest.importorskip("ray", reason="pip install -e '.[dev]' installs ray for the worker tests")


@pytest.fixture(scope="module")
def ray_cluster():
    from bridgerl.distributed.actors import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def _prompts(tokenizer, count):
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i} + {2 * i}?"}],
                                          add_generation_prompt=True, return_dict=False) for i in range(count)]


def _assert_same_rollouts(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    assert a.completions == b.completions
    assert torch.equal(a.versions, b.versions)
    # The same tokens through the same weights; the batch shapes differ, so log-probs may differ in the last bits.
    torch.testing.assert_close(a.gen_logprobs, b.gen_logprobs, atol=1e-5, rtol=0)


def test_per_prompt_seeds_do_not_depend_on_batching(policy, tokenizer):
    """A prompt's samples depend on its seed only: chunking the batch differently changes nothing."""
    prompts, s = _prompts(tokenizer, 6), RolloutConfig(n=4, max_new_tokens=16)
    whole = HFGenerator(policy, tokenizer, batch_size=256, per_prompt_seeds=True)
    chunked = HFGenerator(policy, tokenizer, batch_size=8, per_prompt_seeds=True)  # 2 prompts per call
    a = whole.generate(prompts, 4, s, torch.Generator().manual_seed(1))
    b = chunked.generate(prompts, 4, s, torch.Generator().manual_seed(1))
    _assert_same_rollouts(a, b)
    c = whole.generate(prompts, 4, s, torch.Generator().manual_seed(2))
    assert not torch.equal(a.completion_ids, c.completion_ids)  # the seed does matter


def test_pool_matches_in_process_engine(ray_cluster, policy, tokenizer):
    from bridgerl.rollout.types import Generator
    from bridgerl.rollout.workers import RayGeneratorPool

    prompts, s = _prompts(tokenizer, 7), RolloutConfig(n=4, max_new_tokens=20)
    engine = HFGenerator(policy, tokenizer, per_prompt_seeds=True)
    pool = RayGeneratorPool(policy, tokenizer, workers=2)
    try:
        assert isinstance(pool, Generator)
        _assert_same_rollouts(engine.generate(prompts, 4, s, torch.Generator().manual_seed(3)),
                              pool.generate(prompts, 4, s, torch.Generator().manual_seed(3)))
        moved = load_causal_lm(str(policy.name_or_path))
        with torch.no_grad():
            for p in moved.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.load_weights(moved, 4)
        pool.load_weights(moved, 4)
        a = engine.generate(prompts, 4, s, torch.Generator().manual_seed(3))
        b = pool.generate(prompts, 4, s, torch.Generator().manual_seed(3))
        _assert_same_rollouts(a, b)
        assert b.versions.tolist() == [4] * 28
        seq = [prompts[0] + b.completion_ids[0, :3].tolist()]
        torch.testing.assert_close(pool.score_tokens(seq)[0], engine.score_tokens(seq)[0], atol=1e-5, rtol=0)
        assert pool.restarts == 0
    finally:
        pool.close()


def _kill_when_busy(pid: int, cpu_s: float = 0.05) -> threading.Thread:
    """SIGKILL `pid` once it has spent `cpu_s` more CPU seconds, i.e. while it is working on its share."""
    proc = psutil.Process(pid)
    before = sum(proc.cpu_times()[:2])

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(proc.cpu_times()[:2]) - before > cpu_s:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_worker_killed_mid_step_keeps_the_full_batch(ray_cluster, policy, tokenizer):
    from bridgerl.rollout.workers import RayGeneratorPool

    prompts, s = _prompts(tokenizer, 24), RolloutConfig(n=4, max_new_tokens=64)
    engine = HFGenerator(policy, tokenizer, per_prompt_seeds=True)
    pool = RayGeneratorPool(policy, tokenizer, workers=2)
    try:
        moved = load_causal_lm(str(policy.name_or_path))
        with torch.no_grad():
            for p in moved.parameters():
                p.mul_(1.1)
        engine.load_weights(moved, 2)
        pool.load_weights(moved, 2)
        watcher = _kill_when_busy(pool.group.pids()[1])
        b = pool.generate(prompts, 4, s, torch.Generator().manual_seed(9))
        watcher.join(timeout=5)
        assert pool.restarts == 1  # the kill landed during the step, and the step still returned
        assert b.completion_ids.shape[0] == 24 * 4
        # The replacement got the pushed weights (version 2), not the seed model it was built from.
        _assert_same_rollouts(engine.generate(prompts, 4, s, torch.Generator().manual_seed(9)), b)
    finally:
        pool.close()


def test_reward_workers_match_the_router_and_survive_a_kill(ray_cluster):
    from bridgerl.rewards.math import math_reward
    from bridgerl.rewards.router import RewardRouter
    from bridgerl.rewards.workers import RayRewardPool

    build = functools.partial(RewardRouter, {"add": math_reward, "other": math_reward}, failure_score=-1.0)
    rows = [{"task": "add" if i % 3 else "other", "answer": str(i)} for i in range(10)]
    completions = [str(i if i % 2 else i + 1) for i in range(10)]
    prompts = [f"q{i}" for i in range(10)]
    want, want_m = build()(prompts, completions, rows)
    pool = RayRewardPool(build, workers=2)
    try:
        got, got_m = pool(prompts, completions, rows)
        assert torch.equal(got, want)
        for k, v in want_m.items():
            assert got_m[k] == pytest.approx(v), k
        os.kill(pool.group.pids()[0], signal.SIGKILL)
        again, _ = pool(prompts, completions, rows)
        assert torch.equal(again, want) and pool.restarts == 1
    finally:
        pool.close()
