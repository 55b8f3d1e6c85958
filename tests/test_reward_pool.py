"""Rewards in killable worker processes (rewards/pool.py) and the reward registry.

The hanging inputs are real: `\\boxed{9^{9^{9^{9}}}}` makes Math-Verify/sympy run for minutes
(a thread-based timeout cannot stop it), and `sum(range(10**15))` is one C call that no signal
interrupts. Each test bounds its wall time a few seconds above the timeout it sets."""
from __future__ import annotations

import textwrap
import time

import pytest

from bridgerl.config import RewardsConfig, TaskRewardConfig
from bridgerl.rewards.pool import Failure, PooledReward, RewardPool
from bridgerl.rewards.registry import MATH_SPEC, build_rewarder
from bridgerl.rewards.router import RewardRouter

TOWER = "The answer is $\\boxed{9^{9^{9^{9}}}}$"


@pytest.fixture(scope="module")
def pool():
    p = RewardPool(2, preload=(MATH_SPEC,))
    yield p
    p.close()


@pytest.fixture
def user_rewards(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(textwrap.dedent("""
        import math, os

        def length(completions, **_):
            return [float(len(c)) for c in completions]

        def stuck_in_c(completions, **_):
            if any("hang" in c for c in completions):
                sum(range(10**15))  # one C call: signals and threads cannot stop it
            return [1.0] * len(completions)

        def wrong_length(completions, **_):
            return [1.0]

        def nan(completions, **_):
            return [math.nan] + [1.0] * (len(completions) - 1)

        def raises(completions, **_):
            raise RuntimeError("bad reward")

        def dies(completions, **_):
            os._exit(3)

        def busy(completions, **_):  # about 0.3 s of CPU per sample
            import time
            end = time.process_time() + 0.3
            while time.process_time() < end:
                pass
            return [1.0] * len(completions)

        def sleeps(completions, **_):  # blocked, using no CPU
            import time
            time.sleep(60)
            return [1.0] * len(completions)
    """))
    return str(path)


def _rows(answers, task="t"):
    return [{"answer": a, "task": task} for a in answers]


def test_hanging_math_sample_is_killed_alone_and_later_calls_stay_fast(pool):
    # Math-Verify's own signal timeout off: only the pool's SIGKILL can stop the tower.
    fn = PooledReward(MATH_SPEC, pool, per_sample=True, extra={"timeout_s": None})
    router = RewardRouter({"t": fn}, failure_score=-1.0, timeout_s=2.0)
    good = ["$\\boxed{5}$"] * 6 + ["$\\boxed{4}$"] * 5
    assert pool.wait_ready(120)  # start-up (imports) is not what this test times

    start = time.monotonic()
    scores, m = router(["p"] * 12, good[:6] + [TOWER] + good[6:], _rows(["5"] * 12))
    elapsed = time.monotonic() - start
    assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f} s with a 2 s timeout"
    assert scores.tolist() == [1.0] * 6 + [-1.0] + [0.0] * 5  # only the hanging sample fails
    assert m["reward/timeouts"] == 1 and m["reward/failures/timeout"] == 1 and m["reward/failures"] == 1
    assert pool.kills >= 1

    start = time.monotonic()
    scores, m = router(["p"] * 11, good, _rows(["5"] * 11))
    assert time.monotonic() - start < 1.0  # the replacement worker was started in the background
    assert scores.tolist() == [1.0] * 6 + [0.0] * 5 and m["reward/timeouts"] == 0


def test_math_verify_signal_timeout_stops_the_tower_inside_the_worker(pool):
    # The default: Math-Verify's alarm fires in the worker's main thread and scores 0 (§1.2),
    # no kill needed; the hard timeout stays a backstop.
    fn = PooledReward(MATH_SPEC, pool, per_sample=True, extra={"timeout_s": 1})
    router = RewardRouter({"t": fn}, failure_score=-1.0, timeout_s=20.0)
    kills = pool.kills
    start = time.monotonic()
    scores, m = router(["p"] * 2, [TOWER, "$\\boxed{5}$"], _rows(["5", "5"]))
    assert time.monotonic() - start < 1.0 + 3.0
    assert scores.tolist() == [0.0, 1.0] and m["reward/timeouts"] == 0 and pool.kills == kills


def test_user_function_stuck_in_c_is_killed_and_counted(pool, user_rewards):
    fn = PooledReward(f"{user_rewards}:stuck_in_c", pool, per_sample=False)
    router = RewardRouter({"t": fn}, failure_score=-1.0, timeout_s=1.5)
    start = time.monotonic()
    scores, m = router(["p"] * 3, ["ok", "hang", "ok"], _rows(["1"] * 3))
    assert time.monotonic() - start < 1.5 + 3.0
    # A whole-batch function is one call: all its samples fail together.
    assert scores.tolist() == [-1.0] * 3 and m["reward/timeouts"] == 3
    scores, m = router(["p"] * 3, ["ok"] * 3, _rows(["1"] * 3))
    assert scores.tolist() == [1.0] * 3 and m["reward/timeouts"] == 0


@pytest.mark.parametrize("name, kind", [("wrong_length", "length"), ("raises", "exception"), ("dies", "exception")])
def test_user_function_failures_are_counted_and_the_pool_goes_on(pool, user_rewards, name, kind):
    router = RewardRouter({"bad": PooledReward(f"{user_rewards}:{name}", pool, per_sample=False),
                           "good": PooledReward(f"{user_rewards}:length", pool, per_sample=False)},
                          failure_score=-1.0, timeout_s=10.0)
    rows = _rows(["1"] * 3, "bad") + _rows(["1"] * 2, "good")
    scores, m = router(["p"] * 5, ["a", "bb", "ccc", "dddd", "eeeee"], rows)
    assert scores.tolist() == [-1.0] * 3 + [4.0, 5.0]
    assert m[f"reward/failures/{kind}"] == 3 and m["reward/failures"] == 3
    scores, _ = router(["p"] * 2, ["xy", "z"], _rows(["1"] * 2, "good"))
    assert scores.tolist() == [2.0, 1.0]


def test_nan_from_a_pooled_function_is_counted(pool, user_rewards):
    router = RewardRouter({"t": PooledReward(f"{user_rewards}:nan", pool, per_sample=False)}, failure_score=-1.0)
    scores, m = router(["p"] * 3, ["a", "b", "c"], _rows(["1"] * 3))
    assert scores.tolist() == [-1.0, 1.0, 1.0] and m["reward/failures/nan"] == 1


def test_pool_matches_in_process_scores_on_many_samples(pool):
    completions = [f"$\\boxed{{{k % 7}}}$" if k % 3 else "no answer" for k in range(16)]
    answers = [str(k % 5) for k in range(16)]
    pooled = RewardRouter({"t": PooledReward(MATH_SPEC, pool, per_sample=True)})
    from bridgerl.rewards.math import math_reward
    inline = RewardRouter({"t": math_reward})
    a, _ = pooled(["p"] * 16, completions, _rows(answers))
    b, _ = inline(["p"] * 16, completions, _rows(answers))
    assert a.tolist() == b.tolist() and a.sum() > 0


def test_registry_places_each_kind(user_rewards):
    from bridgerl.rewards.math import math_reward
    from bridgerl.rewards.partial import partial_credit_reward

    cfg = RewardsConfig(tasks={"m": TaskRewardConfig(kind="math"), "p": TaskRewardConfig(kind="partial"),
                               "u": TaskRewardConfig(kind="python", function=f"{user_rewards}:length"),
                               "rg:*": TaskRewardConfig(kind="reasoning_gym")}, processes=2)
    router = build_rewarder(cfg, default_task="m")
    assert isinstance(router.task_fns["m"], PooledReward) and router.task_fns["m"].per_sample
    assert isinstance(router.task_fns["u"], PooledReward) and not router.task_fns["u"].per_sample
    assert isinstance(router.task_fns["rg:*"], PooledReward)
    assert router.task_fns["p"] is partial_credit_reward  # nothing to hang on: stays in process
    scores, m = router(["q"] * 3, ["$\\boxed{2}$", "ab", "\\boxed{3}"], [{"answer": "2"}, {"task": "u"},
                                                               {"task": "p", "answer": "3"}])
    assert scores.tolist() == [1.0, 2.0, 1.0] and m["reward/failures"] == 0

    inline = build_rewarder(cfg.model_copy(update={"processes": 0}))
    assert inline.task_fns["m"] is math_reward


def test_registry_refuses_a_bad_function_before_anything_runs(tmp_path):
    cfg = RewardsConfig(tasks={"u": TaskRewardConfig(kind="python", function="no_such_module_xyz:f")})
    from bridgerl.config import ConfigError
    with pytest.raises(ConfigError, match="'rewards.tasks.u.function' = .*no module named 'no_such_module_xyz'"):
        build_rewarder(cfg)


def test_failure_is_plain_data():
    assert Failure("timeout", "x") == Failure("timeout", "x")


def test_a_worker_that_only_waits_for_a_core_is_not_timed_out(user_rewards):
    """The timeout counts the worker's CPU time: stopped (SIGSTOP, as a loaded machine would leave it
    waiting) for longer than the timeout, it finishes its samples instead of being killed."""
    import os
    import signal
    import threading

    pool = RewardPool(1)
    try:
        assert pool.wait_ready(120)
        fn = PooledReward(f"{user_rewards}:busy", pool, per_sample=True)
        out = {}
        call = threading.Thread(target=lambda: out.setdefault("r", fn.run(
            {"completions": ["a", "b", "c"]}, 3, timeout_s=1.0)))
        call.start()
        time.sleep(0.15)
        pid = pool._workers[0].process.pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2.0)  # twice the timeout of wall time, no CPU
        os.kill(pid, signal.SIGCONT)
        call.join(30)
        assert out["r"] == [1.0, 1.0, 1.0] and pool.kills == 0
    finally:
        pool.close()


def test_a_reward_that_blocks_without_cpu_is_killed_at_the_wall_cap(user_rewards):
    from bridgerl.rewards.pool import WALL_CAP

    pool = RewardPool(1)
    try:
        assert pool.wait_ready(120)
        fn = PooledReward(f"{user_rewards}:sleeps", pool, per_sample=True)
        start = time.monotonic()
        out = fn.run({"completions": ["a"]}, 1, timeout_s=0.5)
        elapsed = time.monotonic() - start
        assert isinstance(out[0], Failure) and out[0].kind == "timeout" and pool.kills == 1
        assert WALL_CAP * 0.5 <= elapsed < WALL_CAP * 0.5 + 3.0
    finally:
        pool.close()


def test_cpu_time_limit_counts_cpu_not_waiting():
    from bridgerl.rewards.timeout import cpu_time_limit

    start = time.process_time()
    with pytest.raises(TimeoutError):
        with cpu_time_limit(0.2):
            while True:
                pass
    assert 0.2 <= time.process_time() - start < 1.0
    with cpu_time_limit(0.1):
        time.sleep(0.4)  # no CPU used: a wall-clock alarm would have fired here
    with pytest.raises(TimeoutError):  # code that swallows every Exception is stopped all the same
        with cpu_time_limit(0.2):
            while True:
                try:
                    sum(range(10**5))
                except Exception:  # noqa: BLE001
                    pass


def test_a_half_written_board_never_reads_as_a_sample_past_its_deadline():
    """The worker's board names the job before its start time could be read (a preempted writer):
    the parent must wait from when it sent the chunk, not from time 0 (that killed healthy workers
    within milliseconds). Then `_post`'s full record is read as it was written."""
    import mmap
    import os
    from types import SimpleNamespace

    from bridgerl.rewards import pool as P

    board = mmap.mmap(-1, P.BOARD.size)
    sent = time.monotonic()
    w = P._Worker(process=SimpleNamespace(pid=os.getpid()), conn=None, board=board,
                  chunk=P._Chunk([0, 1], True, job=7, sent=sent))
    board[0:16] = P._IDS.pack(7, 1)  # ids written, times still zero
    deadline, pos = P.RewardPool._deadline(None, w, 1.0)
    assert deadline == pytest.approx(sent + 1.0) and pos is None
    P._post(board, 7, 1)
    job, pos, since, cpu = P._read(board)
    assert (job, pos) == (7, 1) and since >= sent and cpu > 0
    deadline, pos = P.RewardPool._deadline(None, w, 1.0)
    assert deadline == pytest.approx(since + 1.0) and pos == 1
