"""The one verified weight push every engine goes through.

A push that hangs, fails half-way or lands the wrong weights would otherwise show up only as a slow
drift in the training curves. So every push runs under a deadline and is followed by a probe: the
engine scores a few fixed token sequences, and its log-probs must equal the policy's own."""
from __future__ import annotations

import threading
import time

import torch

from .hf import sequence_token_logprobs


class WeightSyncError(RuntimeError):
    """The generator does not hold the policy's weights after a push; the run must stop."""


def probe_sequences(vocab_size: int, count: int = 4, length: int = 24, seed: int = 1234) -> list[list[int]]:
    """Fixed token sequences (same on every call) that exercise every layer and many vocabulary rows.

    Random ids rather than text: a wrong lm_head row or a stale layer moves their log-probs by whole
    nats, and no tokenizer is needed."""
    g = torch.Generator().manual_seed(seed)
    lengths = [length - 3 * i for i in range(count)]  # unequal lengths also exercise the padding path
    return [torch.randint(2, vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def policy_logprobs(policy: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The policy's own log-probs of the probe, in eval mode (no dropout), training mode restored after."""
    was_training = policy.training
    policy.eval()
    try:
        return sequence_token_logprobs(policy, sequences, pad_id=0)
    finally:
        policy.train(was_training)


def _run_with_deadline(fn, timeout_s: float, what: str):
    """Run fn() in a daemon thread; raise WeightSyncError if it does not finish in time.

    A thread cannot be killed, so after a timeout the engine is in an unknown state: the caller must
    stop (which is what the error says), never sample from it again."""
    result: dict = {}
    # OpenMP's thread count is per thread: a new thread starts from the default, while engines size
    # their kernels by the caller's count (vLLM's CPU attention checks that they agree). torch._C's
    # setter, because vLLM's CPU worker replaces torch.set_num_threads with a no-op.
    threads = torch.get_num_threads()

    def target():
        try:
            torch._C.set_num_threads(threads)
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            result["error"] = e

    thread = threading.Thread(target=target, name=f"bridgerl-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise WeightSyncError(f"{what} did not finish within rollout.sync_timeout_s={timeout_s:g} s; the engine "
                              "may be hung or unreachable. Check it (server log, memory), or raise the timeout.")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def push_weights(generator, policy: torch.nn.Module, version: int, timeout_s: float,
                 probe: list[list[int]] | None, tolerance: float = 1e-3) -> dict:
    """generator.load_weights(policy, version), then check it landed. Returns the sync metrics.
    Without a `probe`, only the deadline applies.

    Raises WeightSyncError with the reason: the push or the probe timed out, the engine refused the
    weights (wrong names or shapes, server unreachable), the probe came back with the wrong shape, or
    the engine's log-probs differ from the policy's by more than `tolerance` (stale or wrong weights)."""
    engine = type(generator).__name__
    start = time.perf_counter()
    try:
        _run_with_deadline(lambda: generator.load_weights(policy, version), timeout_s, f"{engine}.load_weights")
    except WeightSyncError:
        raise
    except Exception as e:
        raise WeightSyncError(f"weight push to {engine} failed ({type(e).__name__}: {e}); the run cannot go on "
                              "with a generator that holds other weights than the policy") from e
    pushed_s = time.perf_counter() - start
    if probe is None:
        return {"time/sync_push": pushed_s}
    remaining = max(timeout_s - pushed_s, 1.0)
    try:
        got = _run_with_deadline(lambda: generator.score_tokens(probe), remaining, f"{engine}.score_tokens (probe)")
    except WeightSyncError:
        raise
    except Exception as e:
        raise WeightSyncError(f"probing {engine} after the push failed ({type(e).__name__}: {e})") from e
    want = policy_logprobs(policy, probe)
    if len(got) != len(want) or any(tuple(g.shape) != tuple(w.shape) for g, w in zip(got, want)):
        raise WeightSyncError(
            f"{engine} returned probe log-probs of shapes {[tuple(g.shape) for g in got]}, expected "
            f"{[tuple(w.shape) for w in want]}: its score_tokens is broken or it runs another tokenizer/model")
    diff = max(float((g.float().cpu() - w.float().cpu()).abs().max()) for g, w in zip(got, want))
    if not diff <= tolerance:  # also catches NaN
        raise WeightSyncError(
            f"after pushing version {version}, {engine}'s log-probs differ from the policy's by up to {diff:.4g} "
            f"nats (tolerance rollout.sync_tolerance={tolerance:g}): the engine holds stale or wrong weights. "
            "If the engine runs in a lower precision than the trainer, raise rollout.sync_tolerance.")
    return {"sync/max_logprob_diff": diff, "time/sync_verified": time.perf_counter() - start,
            "time/sync_push": pushed_s}
