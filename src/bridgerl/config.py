"""The one config tree. YAML + `a.b.c=value` overrides; unknown keys, wrong types and impossible
combinations are refused before any model loads, with the key path and what is allowed."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    r: int = Field(8, gt=0)
    alpha: int = 16
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[str, list[str]] = "all-linear"
    save_merged: bool = Field(False, description="also save final/merged: the base model with the adapter "
                                                 "merged in, loadable without peft")


class ModelConfig(Strict):
    path: str = Field(..., description="local HF folder or hub id")
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None


class ReferenceConfig(Strict):
    path: str | None = Field(None, description="None: a copy of the initial policy")
    sync: Literal["never", "with_generator"] = "never"


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_new_tokens: int = Field(64, gt=0)


class VLLMEngineConfig(Strict):
    """Options of the in-process vLLM engine (rollout.engine: vllm); see docs/vllm.md."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: model.dtype; float32 makes the engine's log-probs match the trainer's to ~1e-6")
    max_model_len: int | None = Field(None, gt=0, description="prompt + completion tokens per sequence; "
                                                              "None: the model's own limit")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="GPU share for weights + KV cache "
                                                                       "(the trainer shares the GPU when colocated)")
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    enforce_eager: bool = Field(True, description="true: no CUDA graphs (fast start); false: faster decode on GPU")
    enable_prefix_caching: bool = Field(True, description="reuse the KV of shared prompt prefixes")
    sleep_between_steps: bool = Field(False, description="GPU only: free the engine's weights and KV cache while the "
                                                         "trainer updates (vLLM sleep mode level 1), wake at sampling")


class ServerConfig(Strict):
    url: str = Field("http://127.0.0.1:8000", description="base URL of a running vLLM OpenAI-compatible server")
    request_timeout_s: float = Field(600.0, gt=0, description="per HTTP request")
    weights_dir: str | None = Field(None, description="a folder the server also sees: weight pushes go as a "
                                                      "safetensors file there instead of over HTTP (large models)")


class DynamicSamplingConfig(Strict):
    """Groups whose rewards have no spread carry no GRPO gradient; sample more prompts instead."""
    max_rounds: int = Field(0, ge=0, description="extra sampling rounds per step to fill prompts_per_step "
                                                 "informative groups; 0 = off")
    tol: float = Field(0.0, ge=0, description="a group is informative when max − min reward exceeds this "
                                              "(0 for 0/1 rewards; a small value for continuous ones)")


class RolloutConfig(SamplingConfig):
    sync_every: int = Field(1, ge=0, description="1 online, k semi-online, 0 never (offline)")
    n: int = Field(8, ge=2, description="samples per prompt")
    engine: Literal["hf", "vllm", "vllm_server"] = Field(
        "hf", description="hf: bridgerl's own sampler; vllm: an in-process vLLM; vllm_server: a running vLLM server")
    vllm: VLLMEngineConfig = VLLMEngineConfig()
    server: ServerConfig = ServerConfig()
    sync_timeout_s: float = Field(300.0, gt=0, description="a weight push that takes longer stops the run")
    sync_tolerance: float = Field(
        1e-3, gt=0, description="max |log-prob| gap between engine and policy on the probe after a push; "
                                "above it the run stops (raise it for bf16/fp16 engines, e.g. 0.1)")
    sync_check_every: int | None = Field(
        None, ge=0, description="probe every k-th weight push (the first always; 0: never); every push keeps its "
                                "deadline. null: every push for vLLM, server and Ray engines; every 10th for the "
                                "in-process hf copy, where two probe forwards per step cost a tiny model ~7%")
    batch_size: int = Field(256, gt=0, description="sequences per generation call")
    fast_decode: bool = Field(True, description="Llama/Qwen2: decode with plain torch ops (rollout/decode.py); "
                                                "false: always the model's own forward")
    workers: int = Field(0, ge=0, description="Ray generator actors (rollout/workers.py); 0 samples in-process "
                                              "and never starts Ray")
    dynamic_sampling: DynamicSamplingConfig = Field(
        DynamicSamplingConfig(), description="DAPO's dynamic sampling: refill the batch with informative groups")
    max_staleness: int | None = Field(None, ge=0, description="drop samples more than k weight versions older than "
                                                              "the policy (counted); null = unbounded")


class OPTuneConfig(Strict):
    """OPTune (algorithms.md §2): regenerate the lowest-key prompts, train wDPO on the pool's pairs."""
    rho: float = Field(0.5, ge=0, le=1, description="fraction of prompts regenerated per round")
    key: Literal["chosen_reward", "reward_gap", "random"] = Field(
        "chosen_reward", description="regenerate the lowest-key prompts; random is the same-count baseline")
    beta2: float = Field(1.0, ge=0, description="wDPO gap scale; 0 = plain DPO")
    weighting: Literal["softmax", "sigmoid", "linear", "none"] = "softmax"
    normalize: Literal["zscore", "mean", "none"] = "zscore"


class DPOConfig(Strict):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    pairs: Literal["auto", "random", "best_worst"] = Field(
        "auto", description="auto: random correct-vs-incorrect for binary tasks, best-vs-worst otherwise")
    nll_coef: float = Field(0.0, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    length_normalize: bool = False
    reduction: Literal["mean", "sum"] = "mean"
    optune: OPTuneConfig | None = Field(None, description="OPTune: selective regeneration + wDPO")


class GroupDPOConfig(Strict):
    """GroupDPO: the DPO loss averaged over every better-vs-worse pair of a group."""
    name: Literal["group_dpo"] = "group_dpo"
    beta: float = Field(0.1, gt=0)
    length_normalize: bool = False


class GRPOVIConfig(Strict):
    """GRPOVI (algorithms.md §3): raise each group's reward variance before the advantages."""
    probs: Literal["reference", "uniform"] = Field("reference", description="p: softmax of the reference's "
                                                   "sequence log-probs, or uniform")


class GRPOConfig(Strict):
    name: Literal["grpo"] = "grpo"
    beta: float = Field(0.001, ge=0, description="k3 KL coefficient; 0 skips the reference model")
    normalize_std: bool = True
    aggregation: Literal["sum", "token_mean", "seq_mean"] = "sum"
    updates_per_batch: int = Field(1, ge=1)
    importance: Literal["clip", "truncate"] = "clip"
    clip_eps: float = Field(0.2, gt=0)
    truncate_max: float = Field(2.0, gt=1)
    grpovi: GRPOVIConfig | None = None
    loss: Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo"] = Field(
        "grpo", description="policy loss variant (algos/policy_loss.py); grpo honours importance and aggregation, "
                            "the others fix their own")
    clip_eps_high: float | None = Field(None, gt=0, description="upper clip ε (clip-higher); null = clip_eps, "
                                                                "except loss=dapo: 0.28 (the DAPO paper)")
    gspo_clip_eps: float = Field(3e-4, gt=0, description="GSPO's lower clip on the sequence ratio (paper: 3e-4)")
    gspo_clip_eps_high: float = Field(4e-4, gt=0, description="GSPO's upper clip (paper: 4e-4)")
    rollout_correction: Literal["none", "token_tis", "seq_mask"] = Field(
        "none", description="train/infer mismatch: token_tis weights tokens by min(π_train/π_gen, C); seq_mask "
                            "drops sequences whose geometric-mean ratio leaves [1/C, C] (algos/correction.py)")
    correction_threshold: float = Field(2.0, gt=1, description="C of rollout_correction")

    @model_validator(mode="before")
    @classmethod
    def _dapo_clip_higher(cls, data):
        # DAPO without clip-higher is not DAPO; the paper's ε_high fills in when none is given.
        if isinstance(data, dict) and data.get("loss") == "dapo" and data.get("clip_eps_high") is None:
            data = {**data, "clip_eps_high": 0.28}
        return data

    @model_validator(mode="after")
    def _variant_knobs(self):
        if self.loss != "grpo" and self.importance != "clip":
            raise ValueError(f"algo.importance={self.importance} applies to algo.loss=grpo only; loss={self.loss} fixes "
                             "its own ratio treatment (cispo is the truncated one, capped at truncate_max)")
        if self.loss != "grpo" and self.aggregation != "sum":
            raise ValueError(f"algo.aggregation={self.aggregation} applies to algo.loss=grpo only; loss={self.loss} "
                             "fixes its own (dapo/cispo: token mean, dr_grpo: max_new_tokens × sequences, gspo: "
                             "sequence mean); drop algo.aggregation")
        if self.loss in ("gspo", "cispo") and self.clip_eps_high is not None:
            raise ValueError(f"algo.clip_eps_high is not read by loss={self.loss}: gspo clips with gspo_clip_eps and "
                             "gspo_clip_eps_high, cispo caps its weight at truncate_max")
        return self


AlgoConfig = Annotated[Union[DPOConfig, GroupDPOConfig, GRPOConfig], Field(discriminator="name")]


class TaskRewardConfig(Strict):
    kind: Literal["math", "partial", "python", "model", "reasoning_gym"] = Field(
        ..., description="math: Math-Verify 0/1; partial: graded numeric credit in [0, 1]")
    function: str | None = Field(None, description="module:function, for kind=python")
    path: str | None = Field(None, description="reward model folder or hub id, for kind=model")
    binary: bool | None = Field(None, description="None: true for math and reasoning_gym")
    low: float | None = Field(None, description="known reward range (GRPOVI bounds)")
    high: float | None = None

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "python" and not self.function:
            raise ValueError("kind=python needs 'function: module:function'")
        if self.kind == "model" and not self.path:
            raise ValueError("kind=model needs 'path' to a reward model")
        return self

    @property
    def is_binary(self) -> bool:
        return self.binary if self.binary is not None else self.kind in ("math", "reasoning_gym")

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """The reward's known range, where the kind fixes it (GRPOVI's [m, M])."""
        known = (0.0, 1.0) if self.kind in ("math", "partial", "reasoning_gym") else (None, None)
        return (self.low if self.low is not None else known[0], self.high if self.high is not None else known[1])


class RewardsConfig(Strict):
    tasks: dict[str, TaskRewardConfig] = Field(default_factory=lambda: {"arithmetic": TaskRewardConfig(kind="math")})
    failure_score: float = 0.0
    timeout_s: float = Field(10.0, gt=0, description="per call (per sample for math and reasoning_gym), in CPU "
                                                    "time of the worker process (one that blocks is killed at 3× "
                                                    "it of wall time); a call past it is killed and scores "
                                                    "failure_score")
    processes: int = Field(2, ge=0, description="worker processes for math, reasoning_gym and python rewards; "
                                                "0 runs them in the trainer process (a hang cannot be killed)")
    workers: int = Field(0, ge=0, description="Ray reward actors (rewards/workers.py) for reward models and slow "
                                              "verifiers; 0 scores in-process")


class EfficacyConfig(Strict):
    """DELT (algorithms.md §4): score the data, select from it, order it."""
    scorer: Literal["file", "loss", "pass_rate"] = Field(
        "file", description="file: a scores file (e.g. LQS from `bridgerl score`); loss: seed-model NLL of the "
                            "target; pass_rate: seed-policy mean reward per RL prompt")
    scores_file: str | None = None
    select: Literal["all", "top_ratio", "threshold"] = "all"
    ratio: float = Field(1.0, gt=0, le=1)
    threshold: float = 0.0
    order: Literal["shuffle", "sorted", "folding"] = "folding"
    folds: int = Field(3, ge=1)
    invert: bool = Field(False, description="flip the scores' sign: keep / start from the lowest raw score")


class DataConfig(Strict):
    train: str = Field("builtin:arithmetic", description="jsonl path, datasets folder/id, or builtin:<task>")
    eval: str | None = Field(None, description="None: the built-in task's held-out split")
    num_train: int = Field(2000, gt=0, description="rows generated for builtin tasks")
    num_eval: int = Field(128, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    default_task: str | None = None
    efficacy: EfficacyConfig | None = None


class OptimConfig(Strict):
    lr: float = Field(1e-5, gt=0)
    adam_eps: float = Field(1e-8, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="linear / cosine decay ends at lr × this "
                                "(DELT's pretraining recipe: cosine to 0.1)")
    grad_clip: float = Field(1.0, ge=0, description="0 = off")


class AlarmsConfig(Strict):
    """Collapse detectors (train/alarms.py); None turns one off."""
    entropy_min: float | None = Field(0.02, ge=0, description="mean sampler token entropy (nats) below this ...")
    entropy_steps: int = Field(5, ge=1, description="... for this many steps in a row")
    length_share: float | None = Field(0.5, ge=0, le=1, description="share of samples cut at max_new_tokens above this ...")
    length_steps: int = Field(5, ge=1, description="... for this many steps in a row")
    reward_std_min: float | None = Field(None, ge=0, description="batch reward std below this (e.g. 1e-6) ...")
    reward_steps: int = Field(10, ge=1, description="... for this many steps in a row")
    reward_z: float | None = Field(8.0, gt=0, description="mean reward this many running sds from its running mean")
    reward_warmup: int = Field(10, ge=1, description="steps of baseline before reward_z applies")
    reward_abs_max: float | None = Field(None, gt=0, description="|mean reward| above this is an explosion")
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1, description="on_collapse=rollback: lr multiplier")
    max_rollbacks: int = Field(3, ge=0, description="on_collapse=rollback: after this many, stop")


class TrainConfig(Strict):
    steps: int = Field(100, gt=0)
    seed: int = 0
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    micro_batch: int = Field(64, gt=0, description="sequences per forward/backward; accumulates to the step")
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    save_final: bool = True
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16: fp32 weights and optimizer, training forwards under bf16 autocast, "
                          "generator and reference held in bf16")
    alarms: AlarmsConfig = AlarmsConfig()
    on_collapse: Literal["warn", "stop", "rollback"] = Field(
        "warn", description="when an alarm fires: log it; stop the run; or restore the last checkpoint "
                            "with a lower lr (train.alarms.rollback_lr_factor)")

    @model_validator(mode="after")
    def _rollback_needs_checkpoints(self):
        if self.on_collapse == "rollback" and self.checkpoint_every == 0:
            raise ValueError("train.on_collapse=rollback returns to the last checkpoint, but train.checkpoint_every=0 "
                             "writes none before the end; set train.checkpoint_every (e.g. 10)")
        return self


class EvalConfig(SamplingConfig):
    every: int = Field(0, ge=0, description="0 = only at the end")
    temperature: float = Field(0.0, ge=0)
    max_prompts: int = Field(128, gt=0)
    at_start: bool = True


class LogConfig(Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "bridgerl"
    progress: bool = True


class PathwaysMonitorConfig(Strict):
    """Grokking monitors (algorithms.md §5) on a fixed probe set of training samples."""
    every: int = Field(10, gt=0)
    probe_samples: int = Field(32, ge=2, description="distance compares pairs, so at least 2")
    tau: float = Field(0.7, gt=0, lt=1)
    level: Literal["char", "expert"] = Field("char", description="edit distance over characters or expert ids")


class MonitorConfig(Strict):
    pathways: PathwaysMonitorConfig | None = None


class Config(Strict):
    model: ModelConfig
    reference: ReferenceConfig = ReferenceConfig()
    algo: AlgoConfig = DPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="after")
    def _combinations(self):
        if self.reference.sync == "with_generator" and self.rollout.sync_every == 0:
            raise ValueError("reference.sync=with_generator never fires when rollout.sync_every=0 (offline); "
                             "use reference.sync=never or a sync_every >= 1")
        if isinstance(self.algo, DPOConfig) and self.algo.optune is not None and (
                self.rollout.dynamic_sampling.max_rounds or self.rollout.max_staleness is not None):
            raise ValueError("algo.optune trains on its stored pool of pairs, which rollout.dynamic_sampling and "
                             "rollout.max_staleness do not select from; drop them or algo.optune")
        k = self.rollout.max_staleness
        if k is not None and self.rollout.sync_every == 0:
            raise ValueError(f"rollout.max_staleness={k} with rollout.sync_every=0 (offline): every sample comes "
                             f"from the seed weights, so all would be dropped after step {k}; use sync_every >= 1 "
                             "or max_staleness=null")
        if k is not None and self.rollout.sync_every > k + 1:
            raise ValueError(f"rollout.max_staleness={k} with rollout.sync_every={self.rollout.sync_every}: the last "
                             f"{self.rollout.sync_every - 1 - k} steps of every sync window would train on nothing; "
                             f"use sync_every <= {k + 1} or a larger max_staleness")
        if self.train.mixed_precision != "no" and self.model.dtype != "float32":
            raise ValueError(f"train.mixed_precision={self.train.mixed_precision} keeps fp32 master weights, so it needs "
                             f"model.dtype=float32 (got {self.model.dtype}); for pure {self.model.dtype} training "
                             "drop train.mixed_precision")
        return self


class ConfigError(ValueError):
    """A config the user must fix; the message names the key path and what is allowed."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def missing_path(value: str) -> bool:
    """True for a local path that does not exist; a hub id ("org/name") is not a local path."""
    if Path(value).expanduser().exists():
        return False
    return not _HUB_ID.match(value) or value.endswith((".py", ".jsonl", ".json", ".csv", ".parquet"))


def check_paths(cfg: "Config") -> None:
    """Refuse, before anything loads, model/reference/reward-model paths that point nowhere."""
    found = [("model.path", cfg.model.path), ("reference.path", cfg.reference.path)]
    found += [(f"rewards.tasks.{name}.path", t.path) for name, t in cfg.rewards.tasks.items() if t.kind == "model"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    for key, value in found:
        if not value:
            continue
        if missing_path(value):
            raise ConfigError(f"config key '{key}' = {value!r}: no such folder (nor a hub id like 'org/name'); "
                              "give a folder with config.json and weights, e.g. one written by `bridgerl tiny`")
        if offline and not Path(value).expanduser().exists() and not _in_hub_cache(value):
            raise ConfigError(f"config key '{key}' = {value!r}: no such folder, and as a hub id it is not in the "
                              "local cache while HF_HUB_OFFLINE=1; fix the path or download the model first")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 — no cache folder yet, or an old huggingface_hub
        return False


def _fields_at(model_cls: type[BaseModel] | None, path: tuple) -> tuple[type[BaseModel] | None, list[str]]:
    """Walk the model tree along `path` to the model class there and its field names."""
    cls = model_cls
    for part in path:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return None, []
        ann = cls.model_fields[part].annotation
        cls = _model_in(ann)
    return cls, (list(cls.model_fields) if cls else [])


def _model_in(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found:
            return found
    return None


def _explain(err: ValidationError, raw: dict, root: type[BaseModel] | None = None) -> str:
    root = root or Config
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("dpo", "group_dpo", "grpo") and e["loc"][0] == "algo"))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = loc[:-1]
            if parent and parent[0] == "algo":
                name = (raw.get("algo") or {}).get("name", "dpo")
                cls_algo = {"grpo": GRPOConfig, "group_dpo": GroupDPOConfig}.get(name, DPOConfig)
                cls, allowed = _fields_at(cls_algo, parent[1:])
            else:
                cls, allowed = _fields_at(root, parent)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean '{'.'.join(map(str, parent + (close[0],)))}'?" if close else ""
            lines.append(f"unknown config key '{key}'{hint} Allowed here: {', '.join(allowed)}")
        elif e["type"] == "literal_error":
            lines.append(f"config key '{key}' = {e.get('input')!r}: {e['msg'].replace('Input should be', 'allowed values are')}")
        elif e["type"] == "union_tag_invalid":
            tag = (e.get("ctx") or {}).get("tag")
            lines.append(f"config key '{key}.name' = {tag!r}: allowed values are {(e.get('ctx') or {}).get('expected_tags')}")
        elif not loc or e["type"] == "value_error":
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "missing":
            lines.append(f"config key '{key}' is required")
        else:
            lines.append(f"config key '{key}' = {e.get('input')!r}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like a.b.c=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{k}' holds a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML, apply `a.b.c=value` overrides, validate: the training config."""
    return load_typed(Config, path, overrides)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


class SFTDataConfig(Strict):
    train: str = Field("builtin:arithmetic", description="jsonl (prompt+completion or messages), dataset, or builtin:<task>")
    num_train: int = Field(2000, gt=0)
    efficacy: EfficacyConfig | None = None


class _SupervisedConfig(Strict):
    """What the two supervised trainers (SFT, reward model) share; each sets its own defaults."""
    model: ModelConfig
    optim: OptimConfig = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10)
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    max_length: int = Field(256, gt=0)
    seed: int = 0
    out_dir: str = "runs/sft"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SFTConfig(_SupervisedConfig):
    """Supervised fine-tuning: loss on the completion tokens only."""
    data: SFTDataConfig = SFTDataConfig()
    log_every: int = Field(10, gt=0)
    monitor: MonitorConfig = MonitorConfig()


class RMConfig(_SupervisedConfig):
    """Bradley–Terry reward model on (prompt, chosen, rejected) rows."""
    data: str = Field("builtin:preference", description="jsonl with prompt/chosen/rejected, or builtin:preference")
    num_train: int = Field(1000, gt=0)
    steps: int = Field(200, gt=0)
    max_length: int = Field(128, gt=0)
    out_dir: str = "runs/rm"


def load_typed(cls: type[BaseModel], path: str | Path | None, overrides: list[str] | None = None):
    """Read YAML, apply overrides and validate into any config tree (Config, SFTConfig, RMConfig)."""
    raw: dict = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    if isinstance(raw.get("algo"), dict):
        raw["algo"].setdefault("name", "dpo")  # the algo union's default member
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, raw, cls)) from None
