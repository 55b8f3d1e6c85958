"""Read a run folder (metrics.jsonl + config.yaml) and summarise it for comparison tables.

A run folder is what `bridgerl train` writes: one JSON line per step, evaluation lines
(step 0 when `eval.at_start`, every `eval.every` steps, and a last line with `"final": true`),
and the config the run used. A run may also hold `summary.json`, a flat mapping of extra
measurements made after training (the demo stores the hidden-rule score there), each either a
number or `{"mean": m, "se": s}`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["RunData", "load_run", "regime_name", "series", "Estimate"]


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error (se = None when unknown)."""
    mean: float
    se: float | None = None

    def format(self, digits: int = 3) -> str:
        if self.mean is None or (isinstance(self.mean, float) and math.isnan(self.mean)):
            return "–"
        if self.se is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.se:.{digits}f}"


@dataclass
class RunData:
    path: Path
    name: str
    config: dict
    lines: list[dict]
    extra: dict = field(default_factory=dict)

    @property
    def step_lines(self) -> list[dict]:
        """Training-step lines (those that carry a training reward)."""
        return [m for m in self.lines if "reward/mean" in m and not m.get("final")]

    @property
    def eval_lines(self) -> list[dict]:
        return [m for m in self.lines if "eval/score" in m]

    @property
    def final_eval(self) -> dict | None:
        finals = [m for m in self.lines if m.get("final") and "eval/score" in m]
        if finals:
            return finals[-1]
        evals = self.eval_lines
        return evals[-1] if evals else None

    @property
    def start_eval(self) -> dict | None:
        starts = [m for m in self.eval_lines if m["step"] == 0]
        return starts[0] if starts else None

    @property
    def steps(self) -> int:
        return max((m["step"] for m in self.step_lines), default=0)

    def tasks(self) -> list[str]:
        """Tasks with their own held-out score in the final evaluation."""
        final = self.final_eval or {}
        return sorted(k.split("/")[1] for k in final if k.startswith("eval/") and k.endswith("/score")
                      and k.count("/") == 2)

    def score(self, task: str | None = None, which: str = "final") -> Estimate | None:
        line = self.final_eval if which == "final" else self.start_eval
        if not line:
            return None
        key = "eval/score" if task is None else f"eval/{task}/score"
        if key not in line:
            return None
        return Estimate(line[key], line.get(key.removesuffix("score") + "score_se"))

    def late_score(self, k: int = 3) -> Estimate | None:
        """Mean of the last `k` evaluations (the final one included): a toy run's score swings between
        evaluations, and one snapshot can land on a swing. se: the standard error of that mean, from
        each evaluation's own standard error."""
        evals = [m for m in self.eval_lines if m["step"] > 0][-k:]
        if not evals:
            return None
        mean = sum(m["eval/score"] for m in evals) / len(evals)
        ses = [m.get("eval/score_se") for m in evals]
        se = math.sqrt(sum(x * x for x in ses)) / len(evals) if all(x is not None for x in ses) else None
        return Estimate(mean, se)

    def total(self, key: str) -> float:
        return float(sum(m.get(key, 0.0) for m in self.step_lines))

    def train_reward(self, last: int = 10) -> float | None:
        """Mean training reward over the last `last` steps (fresh samples for OPTune)."""
        key = reward_key(self)
        values = [m[key] for m in self.step_lines if key in m][-last:]
        return sum(values) / len(values) if values else None

    @property
    def wall_s(self) -> float:
        """Wall time of the training steps (generation, reward, update; evaluation not counted)."""
        return self.total("time/step")


def reward_key(run: RunData) -> str:
    """OPTune trains on stored pairs, so its `reward/mean` is the pairs' reward; its policy's own
    samples are in `reward/fresh_mean`."""
    return "reward/fresh_mean" if any("reward/fresh_mean" in m for m in run.step_lines) else "reward/mean"


def regime_name(config: dict) -> str:
    """A short human name for what a config trains: "online DPO (s=1)", "GRPO + VI", ..."""
    algo = config.get("algo") or {}
    s = (config.get("rollout") or {}).get("sync_every", 1)
    if algo.get("name") == "grpo":
        name = "GRPO" + (" + VI" if algo.get("grpovi") is not None else "")
        return name if s == 1 else f"{name} (s={s})"
    if algo.get("optune"):
        return f"OPTune (ρ={algo['optune'].get('rho')}, s={s})"
    if s == 0:
        return "offline DPO"
    if s == 1:
        return "online DPO (s=1)"
    return f"semi-online DPO (s={s})"


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Load one run folder; a clear error if it is not one."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl; give a run folder written by `bridgerl train`")
    lines = []
    for k, text in enumerate(metrics.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; earlier lines are still good.
            if k == len(metrics.read_text().splitlines()):
                continue
            raise ValueError(f"{metrics}, line {k}: not valid JSON") from None
    cfg_path = path / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    extra_path = path / "summary.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    return RunData(path, name or path.name, config or {}, lines, extra)


def series(run: RunData, key: str, lines: list[dict] | None = None) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping lines without it and non-finite values."""
    xs, ys = [], []
    for m in (run.lines if lines is None else lines):
        v = m.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(m["step"]))
            ys.append(float(v))
    return xs, ys
