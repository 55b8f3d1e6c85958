"""Runs inside vLLM's worker (via `worker_extension_cls`): takes new weights in place.

vLLM mixes this class into its Worker, so `self` is the worker. It must import nothing from
bridgerl beyond this file: a vLLM server in its own environment imports it by dotted path
(`--worker-extension-cls bridgerl.rollout.vllm_worker.WeightLoader`)."""
from __future__ import annotations

import base64
import glob
import os

EXTENSION = "bridgerl.rollout.vllm_worker.WeightLoader"


def _tied_lm_head_fix(model) -> bool:
    """Re-process a tied lm_head after a reload.

    On CPU vLLM packs the lm_head matrix into a kernel-specific layout when the model loads. With
    tied embeddings the checkpoint has no lm_head tensor, so an in-place reload updates only the
    embedding and the packed copy keeps the *old* weights: log-probs come out wrong by whole nats
    without any error. Running the layer's post-load processing again re-packs it from the new
    (shared) weight."""
    lm_head = getattr(model, "lm_head", None)
    method = getattr(lm_head, "quant_method", None)
    if lm_head is None or method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(lm_head)
    return True


class WeightLoader:
    def _bridgerl_reload(self, weights: dict, fix_tied_lm_head: bool) -> dict:
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        fixed = _tied_lm_head_fix(model) if (tied and fix_tied_lm_head) else False
        return {"tensors": len(weights), "tied_lm_head_reprocessed": fixed}

    def bridgerl_load_weights(self, payload, fix_tied_lm_head=True) -> dict:
        """payload: safetensors bytes, or the same base64-encoded (the server's /collective_rpc only
        carries strings). fix_tied_lm_head=False exists only so a test can show the fix is needed."""
        from safetensors.torch import load

        if isinstance(payload, str):
            payload = base64.b64decode(payload)
        if isinstance(fix_tied_lm_head, str):
            fix_tied_lm_head = fix_tied_lm_head.lower() == "true"
        return self._bridgerl_reload(load(payload), fix_tied_lm_head)

    def bridgerl_load_weights_from_dir(self, folder: str) -> dict:
        """Every *.safetensors file in `folder` (a disk both processes see): large models skip HTTP."""
        from safetensors.torch import load_file

        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {folder}")
        weights = {}
        for f in files:
            weights.update(load_file(f))
        return self._bridgerl_reload(weights, True)
