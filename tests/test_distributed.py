"""FSDP2 on 2 gloo ranks (CPU, spawned processes, one torch thread each): 3 GRPO updates on fixed
rollouts, through the loop's own accumulation (train/loop.update_policy; 5 micro-batches, so rank 1
runs a zero-weighted pass), give the single-process losses and weights; a DCP checkpoint survives a rank killed
mid-step, and the resumed run continues identically.

Tolerance: losses to 1e-5 relative, weights to 2e-5 absolute. The two runs do the same arithmetic
except the order of the gradient sum (two ranks' shares summed by the reduce-scatter instead of
accumulated in one .grad), so they agree to float32 rounding, amplified a little by Adam's division."""
import json
import os
import signal
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from bridgerl.algos.objective import BatchContext
from bridgerl.algos.registry import build_objective
from bridgerl.config import GRPOConfig, RolloutConfig
from bridgerl.models import frozen_copy, load_causal_lm
from bridgerl.rollout.hf import HFGenerator
from bridgerl.rollout.logprobs import ReferenceLogprobs
from bridgerl.train.loop import update_policy

ALGO = GRPOConfig(beta=0.01)  # with the KL term, so the reference path runs too
MICRO_BATCH, STEPS, LR = 4, 3, 1e-3


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def _update(policy, reference, optimizer, batch, rewards, step: int) -> dict:
    """The loop's own accumulation (train/loop.update_policy) on fixed rollouts, with the parts of a Run it reads."""
    objective = build_objective(ALGO)
    ctx = BatchContext(binary=torch.zeros(rewards.shape[0], dtype=torch.bool), policy_version=step,
                       reference=ReferenceLogprobs(reference, batch, MICRO_BATCH, False), micro_batch=MICRO_BATCH)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    run = SimpleNamespace(objective=objective, train_policy=policy, policy=policy, optimizer=optimizer,
                          scheduler=scheduler, step=step, cfg=SimpleNamespace(optim=SimpleNamespace(grad_clip=1.0)))
    return update_policy(run, objective.make_batch(batch, rewards, ctx))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, work: str, resume: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from bridgerl.distributed.checkpoint import latest_sharded, load_sharded, save_final_hf, save_sharded
    from bridgerl.distributed.fsdp import full_state_dict, init_distributed, shard_model, shutdown

    init_distributed()
    batch, rewards = torch.load(os.path.join(work, "rollouts.pt"), weights_only=False)
    policy = load_causal_lm(model_dir)
    reference = frozen_copy(policy)
    shard_model(policy)
    optimizer = _optimizer(policy)
    step, losses = 0, []
    if resume:
        step = load_sharded(latest_sharded(work), policy, optimizer)["step"]
    while step < STEPS:
        if step == 2 and not resume and rank == 1:
            # Killed mid-step: after the step-2 checkpoint, during step 3's forward.
            policy.register_forward_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
        m = _update(policy, reference, optimizer, batch, rewards, step)
        step += 1
        losses.append(m["loss"])
        if rank == 0:
            with open(os.path.join(work, f"losses-{'resumed' if resume else 'first'}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"]}) + "\n")
        if step == 2 and not resume:
            save_sharded(work, step, policy, optimizer, {"step": step})
    full = full_state_dict(policy)
    if rank == 0:
        torch.save(full, os.path.join(work, "final.pt"))
    save_final_hf(policy, _tokenizer(), os.path.join(work, "final"))
    shutdown()


def _tokenizer():
    from bridgerl.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def fixed_rollouts(tiny_model_dir, tokenizer, tmp_path_factory):
    work = tmp_path_factory.mktemp("fsdp")
    policy = load_causal_lm(tiny_model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{i} times {i + 3}?"}],
                                             add_generation_prompt=True, return_dict=False) for i in range(6)]
    batch = HFGenerator(policy, tokenizer).generate(prompts, 4, RolloutConfig(n=4, max_new_tokens=12),
                                                    torch.Generator().manual_seed(0))
    rewards = torch.rand((6, 4), generator=torch.Generator().manual_seed(1))
    rewards[5] = 0.5  # one zero-variance group: dropped on both sides
    torch.save((batch, rewards), work / "rollouts.pt")
    return work, batch, rewards


def test_fsdp_two_ranks_equal_single_process_and_resume(tiny_model_dir, fixed_rollouts):
    work, batch, rewards = fixed_rollouts
    policy = load_causal_lm(tiny_model_dir)
    reference = frozen_copy(policy)
    optimizer = _optimizer(policy)
    single = [_update(policy, reference, optimizer, batch, rewards, step) for step in range(STEPS)]

    port = _free_port()
    with pytest.raises(mp.ProcessExitedException):  # rank 1 was killed during step 3
        mp.spawn(_rank_main, args=(2, port, tiny_model_dir, str(work), False), nprocs=2)
    first = [json.loads(line) for line in (work / "losses-first.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2]
    assert not (work / "final.pt").exists()

    mp.spawn(_rank_main, args=(2, _free_port(), tiny_model_dir, str(work), True), nprocs=2)
    resumed = [json.loads(line) for line in (work / "losses-resumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3]

    got = [r["loss"] for r in first + resumed]
    want = [m["loss"] for m in single]
    assert got == pytest.approx(want, rel=1e-5)
    assert [r["grad_norm"] for r in first + resumed] == pytest.approx([m["grad_norm"] for m in single], rel=1e-5)
    final = torch.load(work / "final.pt")
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(final[name], value, atol=2e-5, rtol=0, msg=name)
    # The final save is an ordinary HF folder.
    saved = load_causal_lm(str(work / "final"))
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, final[name], atol=0, rtol=0, msg=name)
