"""The demo's sizes: one frozen dataclass, a full and a quick preset.

Every number here was chosen by measurement on a 2-core CPU (docs/demo.md says how); a stage's
cache key is the part of these settings it uses, so changing one re-runs that stage and the
stages after it, and nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = ["DemoSettings", "FULL", "QUICK", "settings_for"]


@dataclass(frozen=True)
class DemoSettings:
    # the tiny policy
    arch: str = "llama"
    size: str = "micro"
    # seed: SFT on worked solutions of the verifiable task, mixed with the preference prompts'
    # replies (so the seed answers both kinds of prompt)
    sft_task: str = "arithmetic:operands=2-3,digits=1,ops=+-"
    sft_rows: int = 4000
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch: int = 32
    preference_share: float = 0.2  # share of SFT rows that are preference prompts
    preference_keyword_share: float = 0.15  # of those, how many replies follow the hidden rule
    # the comparison (same seed, steps, prompts per step and samples per prompt for every regime);
    # docs/demo.md records the probes behind each number
    rl_task: str = "arithmetic:operands=2-3,digits=1,ops=+-"
    rl_seeds: int = 3  # training seeds per regime (demo seed, +1, +2): the table is their mean ± SE
    steps: int = 200  # at 100, offline, s=5 and s=20 were within noise of each other (docs/demo.md)
    prompts_per_step: int = 32  # 8-16 prompts gave a gradient too noisy to move held-out accuracy
    n: int = 8
    max_new_tokens: int = 40
    rollout_temperature: float = 0.7  # at 1.0 online DPO did not move the sampled held-out score
    lr: float = 1e-4
    adam_eps: float = 1e-8
    warmup_steps: int = 10
    grad_clip: float = 1.0
    dpo_beta: float = 0.1
    grpo_beta: float = 0.001
    semi_online: tuple[int, ...] = (5, 20)  # sync_every of the semi-online regimes
    eval_every: int = 50  # greedy held-out evaluation during training (the step plots)
    eval_temperature: float = 0.0  # of those evaluations; 0 = greedy
    eval_top_p: float = 1.0
    num_eval: int = 400
    # the headline: every final model (and the seed) scored with `final_samples` replies per held-out
    # prompt at `final_temperature`; smoother than greedy, which flips on near-ties
    final_samples: int = 8
    final_temperature: float = 0.6
    num_train: int = 2000
    # the non-verifiable leg
    rm_steps: int = 200
    rm_batch: int = 32
    rm_lr: float = 1e-3
    pref_steps: int = 60
    multitask_steps: int = 200  # online DPO on both tasks mixed
    mixed_eval_per_task: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    def rl_budget(self) -> str:
        return f"{self.steps} steps × {self.prompts_per_step} prompts × {self.n} samples"


FULL = DemoSettings()

# --quick: under 3 minutes on 2 cores. The full demo's batch (32 prompts × 8 samples) for a fifth of
# its steps at twice its lr; one semi-online regime (s=20 would sync once in 40 steps); 2 training
# seeds. docs/demo.md ("--quick") has the probes over 8 training seeds: 16 prompts × 6 samples was
# too noisy for DPO, and 50 steps at lr 1.5e-4 lost the order on the seeds it was not chosen on.
QUICK = replace(
    FULL,
    rl_seeds=2,
    steps=40,
    lr=2e-4,
    warmup_steps=5,
    semi_online=(5,),
    eval_every=40,
    num_eval=256,
    final_samples=4,
    rm_steps=80,
    pref_steps=10,
    multitask_steps=10,
    mixed_eval_per_task=64,
)


def settings_for(quick: bool) -> DemoSettings:
    return QUICK if quick else FULL


def config_from(raw: dict, path: Path):
    """Write `raw` as YAML at `path` and load it as `bridgerl train` would: the file is the exact
    config a user can rerun, and a bad value gets the loader's own error message."""
    import yaml

    from ..config import load_config

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return load_config(path)
