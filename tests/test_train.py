"""The loop end to end on a tiny model saved to disk: every regime through the real CLI, the sync
invariants of §6, offline caching, resume, and bad input."""
import json
from pathlib import Path

import pytest
import torch

from bridgerl.cli import main
from bridgerl.config import load_config
from bridgerl.train.loop import optimizer_step, train_step
from bridgerl.train.run import build_run

BASE = [
    "data.train=builtin:arithmetic", "data.num_train=24", "data.num_eval=8", "data.prompts_per_step=4",
    "rollout.n=4", "rollout.max_new_tokens=8", "eval.max_prompts=8", "eval.max_new_tokens=8",
    "train.micro_batch=8", "optim.lr=1e-3", "log.progress=false", "log.tensorboard=false",
]


def write_config(tmp_path: Path, model_dir: str) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: {{path: {model_dir}}}\n")
    return cfg


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_lines(out: Path) -> list[dict]:
    return [m for m in read_metrics(out) if "reward/mean" in m]


@pytest.mark.parametrize("algo,sync", [("dpo", 0), ("dpo", 2), ("dpo", 1), ("grpo", 1), ("grpo", 2)])
def test_each_regime_trains_through_the_cli(tmp_path, tiny_model_dir, algo, sync):
    out = tmp_path / "run"
    code = main(["train", str(write_config(tmp_path, tiny_model_dir)), *BASE, f"algo.name={algo}",
                 f"rollout.sync_every={sync}", "train.steps=4", "--out", str(out)])
    assert code == 0
    steps = step_lines(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        for key in ("reward/mean", "reward/std", "completion_length", "entropy", "staleness/mean", "loss",
                    "groups/skipped", "reward/failures", "time/generation", "time/update", "tokens/generated"):
            assert key in m, key
    versions = [m["generator/version"] for m in steps]
    if sync == 0:
        assert versions == [0, 0, 0, 0]  # offline: the generator stays the seed model
    else:
        assert versions == [sync * (t // sync) for t in range(4)]  # snapshot from step s·⌊t/s⌋
        assert max(m["staleness/max"] for m in steps) <= sync - 1
    evals = [m for m in read_metrics(out) if "eval/score" in m]
    assert evals[0]["step"] == 0 and evals[-1].get("final")
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    assert (out / "config.yaml").exists()


def test_offline_generates_each_prompt_once(tmp_path, tiny_model_dir):
    cfg = load_config(write_config(tmp_path, tiny_model_dir),
                      BASE + ["data.num_train=8", "rollout.sync_every=0", f"train.out_dir={tmp_path / 'o'}"])
    run = build_run(cfg)
    generated = [train_step(run)["tokens/generated"] for _ in range(4)]
    assert generated[0] > 0 and generated[1] > 0
    assert generated[2] == 0 and generated[3] == 0  # second epoch: cached samples, no regeneration


def test_reference_moves_only_at_sync_steps(tmp_path, tiny_model_dir):
    cfg = load_config(write_config(tmp_path, tiny_model_dir),
                      BASE + ["rollout.sync_every=2", "reference.sync=with_generator", f"train.out_dir={tmp_path / 'r'}"])
    run = build_run(cfg)

    def snapshot(model):
        return [p.detach().clone() for p in model.parameters()]

    for t in range(5):
        before_policy, before_ref = snapshot(run.policy), snapshot(run.reference)
        train_step(run)
        after_ref = snapshot(run.reference)
        if t % 2 == 0:
            assert all(torch.equal(a, b) for a, b in zip(after_ref, before_policy))
            assert run.generator.version == t
        else:
            assert all(torch.equal(a, b) for a, b in zip(after_ref, before_ref))


@pytest.mark.parametrize("every,probed", [(None, [1, 5]), (1, [1, 2, 3, 4, 5]), (2, [1, 3, 5]), (0, [])])
def test_pushes_are_probed_on_schedule(tmp_path, tiny_model_dir, every, probed):
    """rollout.sync_check_every: the in-process hf copy is probed at its first push and every k-th one
    (default 10; forced to 4 here for the default's case). Step 0 samples from the loaded weights, so the
    pushes are at steps 1–5; each has its deadline (time/sync_push is logged)."""
    extra = [] if every is None else [f"rollout.sync_check_every={every}"]
    cfg = load_config(write_config(tmp_path, tiny_model_dir),
                      BASE + ["rollout.sync_every=1", f"train.out_dir={tmp_path / 'p'}"] + extra)
    run = build_run(cfg)
    assert run.sync_check_every == (10 if every is None else every)
    if every is None:
        run.sync_check_every = 4
    metrics = [train_step(run) for _ in range(6)]
    assert [t for t, m in enumerate(metrics) if "sync/max_logprob_diff" in m] == probed
    assert ["time/sync_push" in m for m in metrics] == [False] + [True] * 5
    assert all(metrics[t]["sync/max_logprob_diff"] < 1e-5 for t in probed)


def test_reference_fixed_when_sync_never(tmp_path, tiny_model_dir):
    cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + [f"train.out_dir={tmp_path / 'f'}"])
    run = build_run(cfg)
    ref0 = [p.detach().clone() for p in run.reference.parameters()]
    for _ in range(3):
        train_step(run)
    assert all(torch.equal(a, b) for a, b in zip(ref0, run.reference.parameters()))


def comparable(lines):
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens/s"))} for m in lines]


@pytest.mark.parametrize("sync", [0, 3])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, sync):
    cfg = write_config(tmp_path, tiny_model_dir)
    common = BASE + [f"rollout.sync_every={sync}", "eval.at_start=false"]
    assert main(["train", str(cfg), *common, "train.steps=4", "--out", str(tmp_path / "full")]) == 0
    assert main(["train", str(cfg), *common, "train.steps=2", "--out", str(tmp_path / "half")]) == 0
    assert main(["train", str(cfg), *common, "train.steps=4", "--out", str(tmp_path / "half"), "--resume"]) == 0
    assert comparable(step_lines(tmp_path / "full")) == comparable(step_lines(tmp_path / "half"))


def test_resume_after_a_half_written_metrics_line(tmp_path, tiny_model_dir):
    """A run killed while writing metrics.jsonl leaves a cut line: resume drops it (and anything after
    the checkpoint) instead of failing to parse it, and the file reads as one clean run."""
    cfg = write_config(tmp_path, tiny_model_dir)
    common = BASE + ["rollout.sync_every=1", "eval.at_start=false"]
    out = tmp_path / "run"
    assert main(["train", str(cfg), *common, "train.steps=2", "--out", str(out)]) == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.5, "rew')  # the kill came mid-line
    assert main(["train", str(cfg), *common, "train.steps=4", "--out", str(out), "--resume"]) == 0
    assert [m["step"] for m in step_lines(out)] == [1, 2, 3, 4]
    assert not (out / "metrics.jsonl.tmp").exists()


def test_resume_refuses_a_config_that_changes_the_run(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    common = BASE + ["eval.at_start=false", "train.steps=2"]
    out = str(tmp_path / "run")
    assert main(["train", str(cfg), *common, "--out", out]) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    changed = ["optim.lr=5e-4", "rollout.n=2"]
    assert main(["train", str(cfg), *common, *changed, "train.steps=3", "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "rollout.n" in err and "--force" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # nothing was touched
    # train.steps and eval settings may change on resume; --force accepts the rest
    assert main(["train", str(cfg), *common, "train.steps=3", "eval.max_prompts=4", "--out", out, "--resume"]) == 0
    assert main(["train", str(cfg), *common, *changed, "train.steps=4", "--out", out, "--resume", "--force"]) == 0
    assert [m["step"] for m in step_lines(tmp_path / "run")] == [1, 2, 3, 4]


def test_kill_during_checkpoint_write_resumes_from_last_good(tmp_path, tiny_model_dir, monkeypatch):
    import bridgerl.train.checkpoint as ckpt

    cfg = write_config(tmp_path, tiny_model_dir)
    common = BASE + ["rollout.sync_every=2", "eval.at_start=false", "train.checkpoint_every=1", "train.steps=4"]
    real_write = ckpt._write

    def dying_write(path, data):
        if "step-0000003" in str(path):
            Path(path).write_bytes(data[: len(data) // 2])  # half a checkpoint
            raise KeyboardInterrupt("killed while writing")
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg), *common, "--out", str(tmp_path / "killed")])
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step-0000002"
    monkeypatch.setattr(ckpt, "_write", real_write)
    assert main(["train", str(cfg), *common, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    assert main(["train", str(cfg), *common, "--out", str(tmp_path / "clean")]) == 0
    assert comparable(step_lines(tmp_path / "killed")) == comparable(step_lines(tmp_path / "clean"))


def test_misspelt_key_is_refused_before_loading(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: /does/not/exist}\n")
    assert main(["train", str(cfg), "rollout.sync_evry=2"]) == 2
    err = capsys.readouterr().err
    assert "rollout.sync_evry" in err and "rollout.sync_every" in err


def test_malformed_data_row_names_file_row_and_field(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"answer": "3"}\n')
    cfg = load_config(write_config(tmp_path, tiny_model_dir),
                      BASE + [f"data.train={data}", "data.default_task=arithmetic", f"train.out_dir={tmp_path / 'x'}"])
    with pytest.raises(Exception) as err:
        build_run(cfg)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "2" in msg and "prompt" in msg


def test_failing_and_hanging_rewards_score_failure_and_run_continues(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import time\n"
        "def raises(prompts, completions, **kw):\n    raise RuntimeError('broken reward')\n"
        "def hangs(prompts, completions, **kw):\n    time.sleep(60)\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "mixed.jsonl"
    rows = [{"prompt": f"say {i}", "task": "a" if i % 2 else "b"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fail"
    code = main(["train", str(write_config(tmp_path, tiny_model_dir)), *BASE, f"data.train={data}",
                 "rewards.tasks={a: {kind: python, function: 'my_rewards:raises'}, b: {kind: python, function: 'my_rewards:hangs'}}",
                 "rewards.timeout_s=0.5", "rewards.failure_score=-1", "train.steps=2", "--out", str(out)])
    assert code == 0
    steps = step_lines(out)
    assert len(steps) == 2
    assert all(m["reward/failures"] == 16 and m["reward/mean"] == -1 for m in steps)


def test_nonfinite_gradient_skips_the_update(tmp_path, tiny_model_dir):
    cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + [f"train.out_dir={tmp_path / 'n'}"])
    run = build_run(cfg)
    before = [p.detach().clone() for p in run.policy.parameters()]
    for p in run.policy.parameters():
        p.grad = torch.full_like(p, float("nan"))
    m = optimizer_step(run)
    assert m["update/skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, run.policy.parameters()))


def test_grpovi_in_the_loop_raises_variance_and_keeps_mean(tmp_path, tiny_model_dir):
    from bridgerl.rewards.partial import partial_credit

    assert partial_credit("19", "19") == 1.0 and partial_credit("x", "19") == 0.0
    assert 0.1 <= partial_credit("15", "19") < 1.0
    cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + [
        "algo.name=grpo", "algo.grpovi={}", "rewards.tasks.arithmetic.kind=partial",
        f"train.out_dir={tmp_path / 'vi'}"])
    run = build_run(cfg)
    from bridgerl.train.loop import Timer, grpovi, reference_for
    from bridgerl.train.loop import sample_batch

    rows = run.stream.next_batch()
    rollouts, _, _ = sample_batch(run, rows, Timer())
    rewards = torch.rand(len(rows), cfg.rollout.n)  # graded rewards with a spread in every group
    shaped, m = grpovi(run, rows, rewards, reference_for(run, rollouts))
    assert m["reward/var_after"] >= m["reward/var_before"]
    assert ((shaped >= 0) & (shaped <= 1)).all()
    metrics = train_step(run)
    assert "reward/var_before" in metrics and metrics["reward/var_after"] >= metrics["reward/var_before"] - 1e-9
    # reward/* report the rewards as scored, not as VI reshaped them (VI keeps the p-weighted mean,
    # not the plain one): the same first step without VI logs the same reward/mean and std
    (tmp_path / "graded.py").write_text(
        "def score(prompts, completions, **_):\n    return [len(c) % 5 / 4 for c in completions]\n")
    graded = ["algo.name=grpo", "rewards.tasks.arithmetic.kind=python", "rollout.temperature=1.5",
              f"rewards.tasks.arithmetic.function={tmp_path / 'graded.py'}:score"]
    first = [train_step(build_run(load_config(write_config(tmp_path, tiny_model_dir), BASE + graded + extra + [
        f"train.out_dir={tmp_path / name}"]))) for name, extra in (("plain", []), ("vi2", ["algo.grpovi={}"]))]
    assert first[1]["reward/var_after"] > first[1]["reward/var_before"]  # VI did reshape this batch
    for key in ("reward/mean", "reward/std", "reward/group_std"):
        assert first[0][key] == first[1][key], key


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_grpo_reads_reference_logprobs_once_per_batch(tmp_path, tiny_model_dir):
    """GRPOVI's p and the KL term share one reference pass; when the reference holds the sampling
    weights (here: rows from the seed model) the sampler's own log-probs stand in and no pass runs."""
    cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + [
        "algo.name=grpo", "algo.beta=0.1", "algo.grpovi={}", "train.micro_batch=4",
        "rollout.temperature=1.5", f"train.out_dir={tmp_path / 'ref'}"])
    run = build_run(cfg)
    calls = count_forwards(run.reference)
    from bridgerl.algos.objective import BatchContext
    from bridgerl.rollout.logprobs import ReferenceLogprobs
    from bridgerl.train.loop import Timer, grpovi, reference_for, update_policy
    from bridgerl.train.loop import sample_batch

    rows, n = run.stream.next_batch(), cfg.rollout.n
    rollouts, _, _ = sample_batch(run, rows, Timer())
    rewards = torch.rand(len(rows), n)
    everything_rows = torch.arange(len(rows) * n)
    given = reference_for(run, rollouts)
    assert given.stand_in and torch.equal(given(everything_rows), rollouts.gen_logprobs) and calls[0] == 0
    everything = ReferenceLogprobs(run.reference, rollouts, 4, stand_in=False)(everything_rows)
    assert torch.allclose(given(everything_rows), everything, atol=1e-4)  # the stand-in equals a real pass

    run.generator.load_weights(run.policy, 1)  # rows from other weights than the reference's
    rollouts, _, _ = sample_batch(run, rows, Timer())
    rewards[0] = 0.5  # a group without spread: neither shaped nor trained, so no reference pass
    calls[0] = 0
    ref = reference_for(run, rollouts)
    shaped, _ = grpovi(run, rows, rewards, ref)
    chunks = -(-(len(rows) - 1) * n // 4)
    assert 0 < calls[0] <= 2 * chunks  # a prompt prefill + a completion pass per micro-batch at most
    assert not ref.done[:n].any() and ref.done[n:].all()
    before = calls[0]

    def update(reference):
        ctx = BatchContext(binary=torch.zeros(len(rows), dtype=torch.bool), reference=reference,
                           policy_version=1, micro_batch=4)
        return update_policy(run, run.objective.make_batch(rollouts, shaped, ctx))

    state = {k: v.clone() for k, v in run.policy.state_dict().items()}
    shared = update(ref)
    assert calls[0] == before  # the objective reads them, it does not recompute them
    run.policy.load_state_dict(state)
    own = update(ReferenceLogprobs(run.reference, rollouts, 4, stand_in=False))
    assert calls[0] > before and own["loss"] == pytest.approx(shared["loss"], abs=1e-5)


@pytest.mark.parametrize("sync,ref_sync,extra,passes", [
    (0, "never", [], False), (1, "with_generator", [], False), (1, "never", [], True),
    (1, "with_generator", ["algo.optune={rho: 1.0}"], True)])  # OPTune's stored pairs carry no sampler log-probs
def test_dpo_skips_the_reference_pass_when_it_holds_the_sampling_weights(tmp_path, tiny_model_dir, sync,
                                                                         ref_sync, extra, passes):
    reward = tmp_path / "length.py"  # graded by length: every group has a best and a worst
    reward.write_text("def score(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")
    cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + [
        "algo.name=dpo", "rewards.tasks.arithmetic.kind=python", f"rewards.tasks.arithmetic.function={reward}:score",
        "rollout.temperature=1.5", f"rollout.sync_every={sync}", f"reference.sync={ref_sync}",
        f"train.out_dir={tmp_path / 'dpo'}", *extra])
    run = build_run(cfg)
    calls = count_forwards(run.reference)
    steps = [train_step(run) for _ in range(3)]
    assert all(m["dpo/pairs"] > 0 for m in steps)
    assert (calls[0] > 0) == passes


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_optune_regenerates_rho_of_known_prompts(tmp_path, tiny_model_dir, rho):
    cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + [
        "data.num_train=4", f"algo.optune={{rho: {rho}}}", f"train.out_dir={tmp_path / 'opt'}"])
    run = build_run(cfg)
    first = train_step(run)
    assert first["optune/prompts_regenerated"] == 4  # a prompt with no pair yet is always sampled
    pool = run.optune_pool
    before = {pid: pool[pid] for pid in pool.prompt_ids()}
    second = train_step(run)
    assert second["optune/prompts_regenerated"] == 4 * rho
    if rho == 0:
        assert second["tokens/generated"] == 0
        assert all(pool[pid] is before[pid] for pid in before)  # untouched pairs are identical
    for entry in pool:
        assert entry.r_chosen >= entry.r_rejected


def test_lora_policy_trains_and_saves_an_adapter(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    reward = tmp_path / "length.py"  # graded by length: every step has pairs, so the adapter moves
    reward.write_text("def score(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")
    code = main(["train", str(write_config(tmp_path, tiny_model_dir)), *BASE, "model.lora={r: 4, save_merged: true}",
                 "rewards.tasks.arithmetic.kind=python", f"rewards.tasks.arithmetic.function={reward}:score",
                 "rollout.temperature=1.5", "optim.lr=1e-2", "train.steps=2", "log.tensorboard=true", "--out", str(out)])
    assert code == 0
    assert (out / "final" / "adapter_config.json").exists() and any((out / "tb").iterdir())
    assert len(step_lines(out)) == 2
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final")
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged")  # plain transformers, no peft
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        a, m, b = (model(input_ids=ids).logits for model in (adapted, merged, base))
    assert torch.allclose(a, m, atol=1e-4) and not torch.allclose(m, b, atol=1e-4)


def test_efficacy_scores_select_and_order_the_prompt_stream(tmp_path, tiny_model_dir):
    from bridgerl.data.efficacy import fold_order
    from bridgerl.data.delt import write_scores
    from bridgerl.train.run import build_rows

    scores = [float(s) for s in torch.randperm(24)]
    rows, _ = build_rows(load_config(write_config(tmp_path, tiny_model_dir), BASE))
    write_scores(tmp_path / "s.jsonl", torch.tensor(scores).numpy(), rows)
    cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + [
        f"data.efficacy={{scorer: file, scores_file: {tmp_path / 's.jsonl'}, select: top_ratio, ratio: 0.5, order: folding}}",
        f"train.out_dir={tmp_path / 'eff'}"])
    run = build_run(cfg)
    seen = [r["id"] for _ in range(3) for r in run.stream.next_batch()]
    kept = sorted(range(24), key=lambda i: scores[i])[12:]  # the top half
    expected = [kept[i] for i in fold_order([scores[i] for i in kept], 3)]
    assert seen == expected
    assert (tmp_path / "eff" / "efficacy_scores.png").exists()
    # The same file refuses to apply to other rows (another seed draws other problems).
    other = load_config(write_config(tmp_path, tiny_model_dir), BASE + ["train.seed=5",
                        f"data.efficacy={{scorer: file, scores_file: {tmp_path / 's.jsonl'}}}", f"train.out_dir={tmp_path / 'o'}"])
    with pytest.raises(ValueError, match="does not score this run's rows"):
        build_run(other)


def test_eval_command_scores_a_model_folder(tmp_path, tiny_model_dir, capsys):
    assert main(["eval", tiny_model_dir, "--task", "builtin:arithmetic", "--num", "8", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):])
    assert 0.0 <= metrics["eval/score"] <= 1.0 and "eval/arithmetic/score_se" in metrics


def test_pathway_monitor_live_and_over_checkpoints(tmp_path, tokenizer, capsys):
    from bridgerl.models import make_tiny_model

    moe = make_tiny_model(tmp_path / "moe", "olmoe", "nano", tokenizer=tokenizer)
    out = tmp_path / "moe-run"
    code = main(["train", str(write_config(tmp_path, str(moe))), *BASE, "train.steps=2", "train.checkpoint_every=1",
                 "train.keep_checkpoints=5", "monitor.pathways={every: 1, probe_samples: 6}", "--out", str(out)])
    assert code == 0
    logged = [m for m in read_metrics(out) if "pathways/distance" in m]
    assert [m["step"] for m in logged] == [0, 1, 2]
    assert all(0 <= m["pathways/smoothness"] <= 1 + 1e-6 for m in logged)
    assert main(["monitor", str(out), "--probe-samples", "6"]) == 0
    per_ckpt = [json.loads(x) for x in (out / "pathways.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_ckpt] == [1, 2]
    assert (out / "pathways.png").exists()
    # The checkpoint measured offline equals the live measurement at the same step.
    assert per_ckpt[-1]["pathways/distance"] == logged[-1]["pathways/distance"]


def test_pathway_monitor_on_dense_model_says_so_and_trains_on(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "dense"
    assert main(["train", str(write_config(tmp_path, tiny_model_dir)), *BASE, "train.steps=2",
                 "monitor.pathways={every: 1, probe_samples: 4}", "--out", str(out)]) == 0
    assert "monitor.pathways is off" in capsys.readouterr().out
    assert len(step_lines(out)) == 2


def changed_fraction(before: list[torch.Tensor], model) -> float:
    changed = sum(int((a != b).sum()) for a, b in zip(before, model.parameters()))
    return changed / sum(a.numel() for a in before)


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path, tiny_model_dir):
    """Training forwards run in bf16, sampling and the reference on bf16 copies, while the policy
    and its optimizer stay fp32: an update far below bf16's resolution still moves the weights,
    where pure bf16 training rounds it away."""
    tiny_lr = ["optim.lr=1e-7", "optim.weight_decay=0", "algo.name=grpo", "algo.beta=0.04",
               "rewards.tasks.arithmetic.kind=python", f"rewards.tasks.arithmetic.function={tmp_path / 'length.py'}:score",
               "rollout.temperature=1.5"]
    (tmp_path / "length.py").write_text("def score(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")

    def run_with(extra, name):
        cfg = load_config(write_config(tmp_path, tiny_model_dir), BASE + tiny_lr + extra + [f"train.out_dir={tmp_path / name}"])
        return build_run(cfg)

    mixed = run_with(["train.mixed_precision=bf16"], "mixed")
    assert next(mixed.policy.parameters()).dtype == torch.float32
    assert next(mixed.generator.model.parameters()).dtype == torch.bfloat16
    assert next(mixed.reference.parameters()).dtype == torch.bfloat16
    seen = []
    lm_head = mixed.policy.get_output_embeddings()
    hook = lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype) if torch.is_grad_enabled() else None)
    before = [p.detach().clone() for p in mixed.policy.parameters()]
    m = train_step(mixed)
    hook.remove()
    assert m["loss"] == m["loss"] and m.get("update/skipped", 0.0) == 0.0
    assert seen and set(seen) == {torch.bfloat16}  # the training forward ran under autocast
    assert changed_fraction(before, mixed.policy) > 0.5
    mixed_step = train_step(mixed)  # the generator took the fp32 weights (cast) at the sync
    assert mixed_step["generator/version"] == 1.0

    pure = run_with(["model.dtype=bfloat16"], "pure")
    before = [p.detach().clone() for p in pure.policy.parameters()]
    assert train_step(pure).get("update/skipped", 0.0) == 0.0
    assert changed_fraction(before, pure.policy) < 0.05  # 1e-7 steps vanish in bf16 but next to ~0 weights

    with pytest.raises(Exception, match="needs model.dtype=float32"):
        load_config(write_config(tmp_path, tiny_model_dir), BASE + ["model.dtype=bfloat16", "train.mixed_precision=bf16"])
