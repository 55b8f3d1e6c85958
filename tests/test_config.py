import pytest

from bridgerl.config import ConfigError, load_config


def load(*overrides, path=None):
    return load_config(path, ["model.path=some/model", *overrides])


def test_defaults_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {path: x}\nalgo: {name: grpo, beta: 0.01}\nrollout: {n: 4}\n")
    cfg = load_config(cfg_file, ["rollout.sync_every=10", "algo.clip_eps=0.1", "optim.betas=[0.9, 0.95]"])
    assert cfg.algo.name == "grpo" and cfg.algo.beta == 0.01 and cfg.algo.clip_eps == 0.1
    assert cfg.rollout.sync_every == 10 and cfg.rollout.n == 4 and cfg.optim.betas == (0.9, 0.95)


def test_misspelt_key_names_path_and_closest_key():
    with pytest.raises(ConfigError) as err:
        load("rollout.sync_evry=3")
    msg = str(err.value)
    assert "rollout.sync_evry" in msg and "did you mean 'rollout.sync_every'" in msg and "Allowed here" in msg


def test_misspelt_key_inside_algo_union():
    with pytest.raises(ConfigError) as err:
        load("algo.name=grpo", "algo.clip_epz=0.1")
    assert "algo.clip_epz" in str(err.value) and "algo.clip_eps" in str(err.value)


def test_wrong_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load("algo.name=ppo")
    assert "'dpo'" in str(err.value) and "'grpo'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load("reference.sync=always")
    assert "reference.sync" in str(err.value) and "with_generator" in str(err.value)


def test_wrong_type_and_range():
    with pytest.raises(ConfigError, match="rollout.n"):
        load("rollout.n=abc")
    with pytest.raises(ConfigError, match="optim.lr"):
        load("optim.lr=-1")


def test_impossible_combination_refused():
    with pytest.raises(ConfigError, match="sync_every=0"):
        load("reference.sync=with_generator", "rollout.sync_every=0")
    with pytest.raises(ConfigError, match="kind=python needs"):
        load("rewards.tasks.custom.kind=python")


def test_missing_model_path():
    with pytest.raises(ConfigError, match="model"):
        load_config(None, [])
