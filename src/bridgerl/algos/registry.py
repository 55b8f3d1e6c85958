"""The one place that maps an algo config to its objective (`algo.name`)."""
from __future__ import annotations

from typing import Any, Callable

from .dpo import DPOObjective
from .group_dpo import GroupDPOObjective
from .grpo import GRPOObjective
from .objective import Objective
from .optune import OPTuneObjective

OBJECTIVES: dict[str, Callable[[Any], Objective]] = {
    "dpo": lambda c: OPTuneObjective(c) if c.optune is not None else DPOObjective(c),
    "group_dpo": GroupDPOObjective,
    "grpo": GRPOObjective,
}


def build_objective(algo_cfg) -> Objective:
    return OBJECTIVES[algo_cfg.name](algo_cfg)
