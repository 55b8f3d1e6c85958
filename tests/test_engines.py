"""rollout/engines.py without vLLM installed: the default engine, and clear errors for the others."""
import importlib.util

import pytest

from bridgerl.config import ConfigError, RolloutConfig, load_config
from bridgerl.models import load_causal_lm
from bridgerl.rollout.engines import build_generator, vllm_model_folder
from bridgerl.rollout.hf import HFGenerator
from bridgerl.rollout.sync import probe_sequences, push_weights
from bridgerl.rollout.vllm import check_layout, export_state, folder_layout, state_to_bytes


def test_hf_is_the_default_engine(tiny_model_dir, tokenizer):
    policy = load_causal_lm(tiny_model_dir)
    g = build_generator(RolloutConfig(), policy, tokenizer, tiny_model_dir)
    assert isinstance(g, HFGenerator)
    assert push_weights(g, policy, 1, 30, probe_sequences(policy.config.vocab_size))["sync/max_logprob_diff"] < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here (tests_vllm/ covers it)")
def test_missing_vllm_names_the_install_command(tiny_model_dir, tokenizer):
    policy = load_causal_lm(tiny_model_dir)
    with pytest.raises(ImportError, match="pip install vllm") as err:
        build_generator(RolloutConfig(engine="vllm"), policy, tokenizer, tiny_model_dir)
    assert "\n" not in str(err.value)


def test_unreachable_server_says_so(tokenizer):
    from bridgerl.rollout.vllm_server import ServerError, VLLMServerGenerator

    with pytest.raises(ServerError, match="unreachable at http://127.0.0.1:9"):
        VLLMServerGenerator("http://127.0.0.1:9", tokenizer, request_timeout_s=5)


def test_engine_config_keys_are_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\n")
    c = load_config(cfg, ["rollout.engine=vllm_server", "rollout.server.url=http://127.0.0.1:8011",
                          "rollout.vllm.dtype=bfloat16", "rollout.sync_timeout_s=30"])
    assert c.rollout.engine == "vllm_server" and c.rollout.vllm.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config(cfg, ["rollout.engine=sglang"])


def test_export_matches_the_saved_layout_and_a_wrong_model_is_refused(tiny_model_dir, tokenizer, tmp_path):
    from bridgerl.models import make_tiny_model

    policy = load_causal_lm(tiny_model_dir)
    state = export_state(policy)
    assert "lm_head.weight" not in state  # tied: vLLM ties it itself
    check_layout(state, folder_layout(tiny_model_dir))
    assert len(state_to_bytes(state)) > 0
    other = load_causal_lm(str(make_tiny_model(tmp_path / "mini", "llama", "mini", tokenizer=tokenizer)))
    with pytest.raises(ValueError, match="not the model the engine was started with"):
        check_layout(export_state(other), folder_layout(tiny_model_dir))


def test_a_policy_without_a_folder_is_saved_once_for_vllm(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    policy = load_causal_lm(tiny_model_dir)
    assert vllm_model_folder(policy, tokenizer, tiny_model_dir) == tiny_model_dir
    folder = vllm_model_folder(policy, tokenizer, None)
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert all((a == b).all() for a, b in zip(again.state_dict().values(), policy.state_dict().values()))
