"""Every shipped example config validates against the config tree."""
from pathlib import Path

import pytest

from bridgerl.config import load_config

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0
