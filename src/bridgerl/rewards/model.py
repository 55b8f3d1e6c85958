"""Scalar reward from a sequence-classification reward model (e.g. Athene-RM, Skywork-RM).

The user/assistant chat is rendered with the tokenizer's chat template (plain
prompt + completion when it has none), scored in batches under `inference_mode`, and the
logit of one label is the reward (label 0 for the usual `num_labels == 1` head).

Padding: transformers' sequence-classification heads pool the logits at the rightmost
token that is not `pad_token_id`. We pad on the right so real tokens keep the positions
they have unpadded, which makes a sample's score independent of what it is batched with.
When the pad token is the eos token, a trailing eos is skipped by that pooling too, but it
is skipped alike with and without padding, so scores stay consistent.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

__all__ = ["RewardModelScorer"]

logger = logging.getLogger(__name__)


def _as_messages(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return list(prompt)
    raise TypeError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt)}")


def _as_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string, got {type(completion)}")


class RewardModelScorer:
    """Score (prompt, completion) pairs with an `AutoModelForSequenceClassification`.

    Callable with TRL's reward signature: `scorer(prompts=[...], completions=[...], **_)`.
    """

    # The router runs it inline without a time limit: a model forward cannot be interrupted,
    # so a timeout would only leave it running in the background while the next step starts.
    reward_timeout_s: float | None = None

    def __init__(self, path_or_id: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, max_length: int | None = None,
                 trust_remote_code: bool = False, label_index: int | None = None, *,
                 model: torch.nn.Module | None = None, tokenizer: Any = None):
        """Load from `path_or_id` (local folder or hub id), or wrap an in-memory `model` + `tokenizer`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            if path_or_id is None:
                raise ValueError("RewardModelScorer needs path_or_id, or model= and tokenizer=")
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(
                    path_or_id, dtype=dtype, trust_remote_code=trust_remote_code)
            except OSError as exc:
                raise OSError(f"could not load reward model {path_or_id!r}: {exc}. Give a local folder with "
                              "config.json, weights and tokenizer files, or a hub id") from exc
        elif tokenizer is None:
            raise ValueError("RewardModelScorer(model=...) also needs tokenizer=")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.__name__ = f"RewardModelScorer({path_or_id or type(model).__name__})"

        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the reward model's tokenizer has neither a pad nor an eos token; set one")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        # The head finds each sequence's last token through config.pad_token_id; it must match the tokenizer.
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        text_config.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id

        num_labels = int(getattr(model.config, "num_labels", 1))
        if label_index is None:
            if num_labels != 1:
                raise ValueError(f"the reward model has {num_labels} labels; pass label_index to pick the "
                                 "logit that is the reward")
            label_index = 0
        if not 0 <= label_index < num_labels:
            raise ValueError(f"label_index {label_index} out of range for {num_labels} labels")
        self.label_index = label_index

        if max_length is None:
            limits = [getattr(tokenizer, "model_max_length", None),
                      getattr(text_config, "max_position_embeddings", None)]
            limits = [m for m in limits if isinstance(m, int) and 0 < m < 10**8]
            max_length = min(limits) if limits else None
        self.max_length = max_length
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, prompt: Any, completion: Any) -> str:
        """The text the reward model sees for one sample."""
        if self.has_chat_template:
            chat = _as_messages(prompt) + [{"role": "assistant", "content": _as_text(completion)}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        if isinstance(prompt, list):
            prompt = "\n".join(m["content"] for m in _as_messages(prompt))
        return prompt + _as_text(completion)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                truncation=self.max_length is not None, max_length=self.max_length,
                # A rendered chat template already holds its special tokens.
                add_special_tokens=not self.has_chat_template)
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            logits = self.model(**enc).logits
            out.extend(logits[:, self.label_index].float().cpu().tolist())
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        return self.score(prompts, completions)
