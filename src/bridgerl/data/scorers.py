"""Model-based data scorers for DELT (algorithms.md §4): per-sample loss / perplexity, RL pass rate,
and the learned scorer head that extrapolates LQS from a scored subset to a whole dataset.

Samples are a mapping (dict or `datasets.Dataset`) with `input_ids` (list of token lists) and an
optional `labels_mask` of the same shape: 1 where a token is an answer token whose prediction counts
in the loss (position 0 never counts: nothing predicts it). Without `labels_mask` every token counts.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from bridgerl.data.efficacy import spearman

ParamSelector = Callable[[str], bool] | Sequence[str] | None


# ---------------------------------------------------------------- samples -> padded tensors

@dataclass
class TokenBatch:
    """Right-padded samples. With right padding, a causal model needs no attention mask: real tokens
    never attend to the pads after them, and pads carry zero loss weight. Dropping the mask keeps
    the forward free of data-dependent branches, which `torch.func.vmap` cannot trace."""

    ids: torch.Tensor  # [N, L] long, pad_id after each sample's end
    mask: torch.Tensor  # [N, L] float, 1 = this token's prediction counts in the loss
    lengths: torch.Tensor  # [N] long, real tokens per sample

    def __len__(self) -> int:
        return self.ids.shape[0]

    def take(self, index) -> "TokenBatch":
        """Rows `index`, trimmed to their own longest sample (less padding per chunk)."""
        index = torch.as_tensor(index, dtype=torch.long)
        lengths = self.lengths[index]
        width = max(int(lengths.max()), 1) if index.numel() else 1
        return TokenBatch(self.ids[index, :width], self.mask[index, :width], lengths)


def _column(samples, name: str):
    if isinstance(samples, Mapping):
        return samples.get(name)
    names = getattr(samples, "column_names", None)
    if names is not None:  # datasets.Dataset
        return samples[name] if name in names else None
    raise TypeError(f"samples must be a dict or datasets.Dataset with 'input_ids' (and optional 'labels_mask'), "
                    f"got {type(samples).__name__}")


def to_token_batch(samples, pad_id: int = 0, max_length: int | None = None) -> TokenBatch:
    """Pad `samples` (see module doc) to a TokenBatch, truncating each to max_length if given."""
    input_ids = _column(samples, "input_ids")
    if input_ids is None:
        raise KeyError("samples have no 'input_ids' column; tokenize them first (list of token-id lists)")
    labels_mask = _column(samples, "labels_mask")
    n = len(input_ids)
    if n == 0:
        raise ValueError("samples are empty; nothing to score")
    if labels_mask is not None and len(labels_mask) != n:
        raise ValueError(f"labels_mask has {len(labels_mask)} rows but input_ids has {n}")
    rows = [list(r)[:max_length] if max_length else list(r) for r in input_ids]
    width = max(len(r) for r in rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width)
    for i, r in enumerate(rows):
        if len(r) < 2:
            raise ValueError(f"sample {i} has {len(r)} tokens; a loss needs at least 2")
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        if labels_mask is None:
            mask[i, 1 : len(r)] = 1.0
        else:
            m = list(labels_mask[i])
            if len(m) != len(input_ids[i]):
                raise ValueError(f"sample {i}: labels_mask has {len(m)} entries but input_ids has {len(input_ids[i])}")
            mask[i, : len(r)] = torch.tensor(m[: len(r)], dtype=torch.float)
            mask[i, 0] = 0.0
        if mask[i].sum() == 0:
            raise ValueError(f"sample {i} has no answer token in labels_mask (after position 0 and truncation); "
                             "drop it or widen its mask")
    return TokenBatch(ids, mask, torch.tensor([len(r) for r in rows], dtype=torch.long))


def samples_from_prompt_lengths(items: Sequence[tuple[Sequence[int], int]]) -> dict[str, list[list[int]]]:
    """(token ids, prompt length) pairs, as SFT encoding produces them -> samples whose answer is the
    part after the prompt."""
    ids = [list(seq) for seq, _ in items]
    masks = [[0] * min(plen, len(seq)) + [1] * max(len(seq) - plen, 0) for seq, plen in items]
    return {"input_ids": ids, "labels_mask": masks}


def masked_mean_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean negative log-likelihood over counted tokens. logits [B, L, V] -> [B]."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision log-softmax loses the ranking signal
        logits = logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L-1]
    weight = mask[:, 1:]
    return (nll * weight).sum(1) / weight.sum(1).clamp_min(1.0)


# ---------------------------------------------------------------- functional model access

@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[nn.Module]:
    """eval() (no dropout, so the proxy run and its adjoint are deterministic) and eager attention
    (CPU SDPA has no forward-mode AD and no vmap batching rule); both restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    switch = impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
    model.eval()
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(impl)
        model.train(was_training)


def split_params(model: nn.Module, select: ParamSelector = None) -> tuple[dict, dict]:
    """(trainable, frozen) detached parameter dicts. select: None = all parameters that require grad,
    a list of names (or name prefixes), or a predicate on the name."""
    named = dict(model.named_parameters())
    if select is None:
        chosen = {n for n, p in named.items() if p.requires_grad}
    elif callable(select):
        chosen = {n for n in named if select(n)}
    else:
        prefixes = tuple(select)
        chosen = {n for n in named if n.startswith(prefixes)}
    if not chosen:
        raise ValueError(f"no parameter matches {select!r}; names look like {list(named)[:4]}")
    trainable = {n: p.detach() for n, p in named.items() if n in chosen}
    frozen = {n: p.detach() for n, p in named.items() if n not in chosen}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    return trainable, frozen


def make_loss_fns(model: nn.Module, frozen: dict):
    """Functional losses of the trainable params: batch_loss(θ, ids [B,L], mask [B,L]) -> mean over
    samples; sample_loss(θ, ids [L], mask [L]) -> scalar, the form `vmap(grad(...))` maps over."""

    def per_sample(theta: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (theta, frozen), (ids,), {"use_cache": False}).logits
        return masked_mean_nll(logits, ids, mask)

    def batch_loss(theta, ids, mask):
        return per_sample(theta, ids, mask).mean()

    def sample_loss(theta, ids, mask):
        return per_sample(theta, ids[None], mask[None])[0]

    return batch_loss, sample_loss


def _chunks(n: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


# ---------------------------------------------------------------- cheap scorers

@torch.no_grad()
def loss_scores(model: nn.Module, samples, batch_size: int = 16, pad_id: int = 0,
                max_length: int | None = None, progress: bool = True) -> np.ndarray:
    """Per-sample mean NLL of the answer tokens under `model` (high = hard / surprising)."""
    data = to_token_batch(samples, pad_id, max_length)
    device = next(model.parameters()).device
    out = torch.empty(len(data), dtype=torch.float64)
    with scoring_mode(model):
        for idx in tqdm(_chunks(len(data), batch_size), desc="loss scores", disable=not progress):
            b = data.take(idx)
            logits = model(input_ids=b.ids.to(device), use_cache=False).logits
            out[idx] = masked_mean_nll(logits, b.ids.to(device), b.mask.to(device)).double().cpu()
    return out.numpy()


def perplexity_scores(model: nn.Module, samples, **kwargs) -> np.ndarray:
    """exp(mean answer-token NLL) per sample; same ranking as `loss_scores`."""
    return np.exp(loss_scores(model, samples, **kwargs))


def pass_rate_scores(rewards) -> np.ndarray:
    """Seed-model pass rate per RL prompt: rewards [num_prompts, n] sampled rewards -> [num_prompts] mean."""
    arr = np.asarray(rewards, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"rewards must be [num_prompts, n] with n >= 1 samples per prompt, got shape {arr.shape}")
    return arr.mean(axis=1)


# ---------------------------------------------------------------- learned scorer head (§4.1 step 4)

@torch.no_grad()
def mean_pooled_features(model: nn.Module, samples, batch_size: int = 16, pad_id: int = 0,
                         max_length: int | None = None, progress: bool = True) -> torch.Tensor:
    """Last hidden state averaged over each sample's real tokens: [N, hidden] float32 on CPU."""
    data = to_token_batch(samples, pad_id, max_length)
    device = next(model.parameters()).device
    feats = []
    with scoring_mode(model):
        for idx in tqdm(_chunks(len(data), batch_size), desc="features", disable=not progress):
            b = data.take(idx)
            hidden = model(input_ids=b.ids.to(device), output_hidden_states=True, use_cache=False).hidden_states[-1]
            real = (torch.arange(b.ids.shape[1]) < b.lengths[:, None]).to(device, hidden.dtype)  # [B, L]
            feats.append(((hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)).float().cpu())
    return torch.cat(feats)


class ScoreHead(nn.Module):
    """Linear head on standardised mean-pooled features; the standardisation is part of the head
    so `predict_scores` applies the statistics of the data it was fitted on."""

    def __init__(self, hidden: int):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(hidden))
        self.register_buffer("feat_std", torch.ones(hidden))
        self.linear = nn.Linear(hidden, 1)
        # Zero init: the fitted direction comes from the data alone, so even a few AdamW steps on a
        # frozen backbone rank samples meaningfully instead of by a random projection.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feat_mean) / self.feat_std).squeeze(-1)


def fit_score_head(
    features: torch.Tensor,  # [N, hidden] from mean_pooled_features (the model stays frozen)
    scores,  # [N] target scores, e.g. z-scored LQS of the proxy subset
    *,
    val_fraction: float = 0.1,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 32,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ScoreHead, dict]:
    """Train the linear head with MSE (AdamW) and keep the epoch with the best validation Spearman.

    Returns (head, metrics) with metrics best_epoch, val_spearman and per-epoch val_spearman_history.
    """
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    n = x.shape[0]
    if y.shape != (n,):
        raise ValueError(f"scores must have one value per feature row ({n}), got shape {tuple(y.shape)}")
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 2:
        raise ValueError(f"{n} scored samples are too few to fit and validate a head; score more samples")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    val, train = perm[:n_val], perm[n_val:]

    head = ScoreHead(x.shape[1])
    head.feat_mean.copy_(x[train].mean(0))
    head.feat_std.copy_(x[train].std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best_rho, best_epoch, best_state, history = -math.inf, -1, None, []
    for epoch in tqdm(range(epochs), desc="score head", disable=not progress):
        head.train()
        for idx in train[torch.randperm(train.numel(), generator=gen)].split(batch_size):
            loss = F.mse_loss(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            rho = spearman(head(x[val]).numpy(), y[val].numpy())
        history.append(rho)
        if rho > best_rho:
            best_rho, best_epoch = rho, epoch
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.eval()
    return head, {"best_epoch": best_epoch, "val_spearman": best_rho, "val_spearman_history": history}


@torch.no_grad()
def predict_scores(head: ScoreHead, features: torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Scores for every feature row (e.g. the whole dataset's mean_pooled_features)."""
    x = torch.as_tensor(features, dtype=torch.float32)
    return torch.cat([head(chunk) for chunk in x.split(batch_size)]).double().numpy()
