import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    from bridgerl.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama-style model saved as an ordinary HF folder, loaded back by from_pretrained."""
    from transformers.utils import logging

    from bridgerl.models import make_tiny_model

    logging.disable_progress_bar()
    path = tmp_path_factory.mktemp("tiny") / "llama-nano"
    make_tiny_model(path, "llama", "nano", seed=0, tokenizer=tokenizer)
    return str(path)


def load_bench(name: str):
    """A script under bench/ imported as a module (bench/ is not a package), for testing its pure parts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
