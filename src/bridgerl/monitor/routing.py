"""Capture MoE router probabilities with forward hooks (algorithms.md §5.2).

Hooks sit on each MoE layer's gate/router module, so routing is read from an ordinary
forward pass. `output_router_logits=True` is never needed (it crashes inside `generate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Config attribute names that carry the number of routed experts in HF MoE models.
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Last name component of a router module in OLMoE / Qwen-MoE / Mixtral / DeepSeek / Switch.
_GATE_NAMES = ("gate", "router")


@dataclass(frozen=True)
class RouterGate:
    """One MoE layer's router: its module path, the module, and its expert count."""

    name: str
    module: nn.Module
    num_experts: int

    def rows(self) -> torch.Tensor:
        """Router weight matrix W_ℓ ∈ R^{K×d}; row k is expert k's embedding v_{ℓk} (§5.3)."""
        weight = self.module.weight
        if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors
            weight = weight.full_tensor()
        return weight.detach()


def _config_expert_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _EXPERT_COUNT_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value > 1:
                return value
    return None


def _router_weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight
    return None


def find_router_gates(model: nn.Module) -> list[RouterGate]:
    """Return the MoE router modules of `model` in layer order.

    A module counts as a router when its name ends in `gate`/`router` (e.g. `mlp.gate`,
    `block_sparse_moe.gate`) or its class name contains "Router", and it holds a 2-D weight
    with one row per expert (`config.num_experts` / `num_local_experts` when the config says).
    Name-based matching keeps dense `gate_proj` Linears and Qwen's 1-output
    `shared_expert_gate` out even when a tiny config makes their sizes coincide.
    """
    expected = _config_expert_count(model)
    gates: list[RouterGate] = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        named_like_router = last in _GATE_NAMES or "router" in type(module).__name__.lower()
        weight = _router_weight(module)
        if not named_like_router or weight is None:
            continue
        n_rows = int(weight.shape[0])
        if n_rows < 2 or (expected is not None and n_rows != expected):
            continue
        if any(name.startswith(g.name + ".") for g in gates):  # a router's own sub-Linear
            continue
        gates.append(RouterGate(name=name, module=module, num_experts=n_rows))
    return gates


def require_router_gates(model: nn.Module) -> list[RouterGate]:
    """Like `find_router_gates`, but a dense model is an error the user can act on."""
    gates = find_router_gates(model)
    if not gates:
        raise ValueError(
            f"No MoE router found in {type(model).__name__}: the pathway monitor needs a "
            "mixture-of-experts policy (e.g. OLMoE, Qwen2-MoE, Mixtral). Disable "
            "`monitor.pathways` for dense models."
        )
    return gates


def _router_logits(output: Any, num_experts: int, gate_name: str) -> torch.Tensor:
    """Pick the [tokens, K] logits out of a router's output (tensor, or tuple led by logits)."""
    candidates = output if isinstance(output, (tuple, list)) else (output,)
    for item in candidates:
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.shape[-1] == num_experts:
            return item
    raise ValueError(
        f"Router `{gate_name}` returned no float tensor with last dimension {num_experts} "
        "(router logits). Its output type is unsupported by RoutingCapture."
    )


def _batch_shape(args: tuple, kwargs: dict) -> tuple[torch.Size | None, torch.Tensor | None]:
    tokens = kwargs.get("input_ids")
    if tokens is None and args and isinstance(args[0], torch.Tensor):
        tokens = args[0]
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    shape = tokens.shape[:2] if isinstance(tokens, torch.Tensor) else None
    return shape, kwargs.get("attention_mask")


class RoutingCapture:
    """Record router probabilities of every MoE layer during a forward pass.

    >>> with RoutingCapture(model) as cap:
    ...     model(input_ids=ids, attention_mask=mask)
    >>> probs = cap.router_probs()   # list over MoE layers of [B, T, K] float32

    Holds the routing of the most recent forward call of `model` only; hooks are removed on
    exit. Dense models raise `ValueError`. With `keep_graph=True` the logits stay attached
    to the autograd graph, so auxiliary router losses (`router_aux_losses`) can be trained
    from them; the default detaches, which is what a monitor wants.
    """

    def __init__(self, model: nn.Module, gates: list[RouterGate] | None = None, keep_graph: bool = False):
        self.model = model
        self.gates = gates if gates is not None else require_router_gates(model)
        self.keep_graph = keep_graph
        self._logits: list[torch.Tensor | None] = [None] * len(self.gates)
        self._batch_shape: torch.Size | None = None
        self.attention_mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def layer_names(self) -> list[str]:
        return [g.name for g in self.gates]

    def __enter__(self) -> "RoutingCapture":
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for index, gate in enumerate(self.gates):
            self._handles.append(gate.module.register_forward_hook(self._gate_hook(index, gate)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._logits = [None] * len(self.gates)
        self._batch_shape, self.attention_mask = _batch_shape(args, kwargs)

    def _gate_hook(self, index: int, gate: RouterGate):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            logits = _router_logits(output, gate.num_experts, gate.name)
            self._logits[index] = logits if self.keep_graph else logits.detach()

        return hook

    def router_logits(self) -> list[torch.Tensor]:
        """Raw router logits per MoE layer, [B, T, K] in the model's dtype."""
        if any(x is None for x in self._logits):
            raise RuntimeError("RoutingCapture saw no complete forward pass; call the model inside the `with` block.")
        out = []
        for gate, logits in zip(self.gates, self._logits):
            if self._batch_shape is not None:
                batch, seq = self._batch_shape
                if logits.numel() != batch * seq * gate.num_experts:
                    raise RuntimeError(
                        f"Router `{gate.name}` saw {logits.numel() // gate.num_experts} tokens, "
                        f"expected {batch}x{seq}; RoutingCapture needs one routing decision per token."
                    )
                logits = logits.reshape(batch, seq, gate.num_experts)
            else:
                logits = logits.reshape(1, -1, gate.num_experts)
            out.append(logits)
        return out

    def router_probs(self) -> list[torch.Tensor]:
        """Full softmax router probabilities per MoE layer, [B, T, K] float32 (§5.2 proposal)."""
        return [torch.softmax(x.float(), dim=-1) for x in self.router_logits()]


def router_aux_losses(
    router_logits: list[torch.Tensor], top_k: int, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Switch/OLMoE auxiliary router losses from per-layer logits [B, T, K] (or [tokens, K]).

    - `load_balance`: K · Σ_e f_e · P_e, with f_e the share of top-k slots routed to expert e
      and P_e its mean router probability, pooled over all layers' tokens (as transformers'
      `load_balancing_loss_func`). Equals top_k when routing is perfectly balanced.
    - `z_loss`: mean over layers and tokens of logsumexp(logits)²; it keeps logits small
      without flattening the softmax, unlike weight decay on the router.

    Padding tokens (attention_mask 0) are left out. Differentiable through the probabilities
    P_e and the logits (f_e comes from a top-k and carries no gradient).
    """
    if not router_logits:
        raise ValueError("router_aux_losses needs the logits of at least one MoE layer.")
    num_experts = router_logits[0].shape[-1]
    keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
    slot_share, prob_sum, z_sum, tokens = 0.0, 0.0, 0.0, 0
    for logits in router_logits:
        flat = logits.reshape(-1, num_experts).float()
        if keep is not None:
            flat = flat[keep.to(flat.device)]
        probs = torch.softmax(flat, dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        slot_share = slot_share + torch.zeros(num_experts, device=flat.device).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=flat.device)
        )
        prob_sum = prob_sum + probs.sum(dim=0)
        z_sum = z_sum + torch.logsumexp(flat, dim=-1).square().sum()
        tokens += flat.shape[0]
    if tokens == 0:
        raise ValueError("router_aux_losses saw no unmasked token.")
    load_balance = num_experts * (slot_share / tokens * (prob_sum / tokens)).sum()
    return {"load_balance": load_balance, "z_loss": z_sum / tokens}


def token_averaged_weights(probs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """ḡ(i, k): router probabilities [B, T, K] averaged over each sample's real tokens → [B, K].

    Padding positions are excluded with `torch.where`, not a product, so a NaN at a fully
    masked position cannot leak into the average.
    """
    if attention_mask is None:
        return probs.mean(dim=1)
    keep = attention_mask.to(device=probs.device).bool()
    counts = keep.sum(dim=1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"Samples {empty} have no unmasked token; drop them from the probe set.")
    summed = torch.where(keep[..., None], probs, torch.zeros((), dtype=probs.dtype, device=probs.device)).sum(dim=1)
    return summed / counts[:, None].to(probs.dtype)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, so left- and right-padded samples route alike."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 64,
    gates: list[RouterGate] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad pass over a probe set.

    Returns token-averaged routing weights [N, L, K] (float32, CPU) and router rows
    [L, K, d] (float32, CPU). The model's train/eval mode is restored afterwards.
    """
    gates = gates if gates is not None else require_router_gates(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with RoutingCapture(model, gates) as cap:
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                mask = attention_mask[start : start + batch_size].to(device)
                model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
                per_layer = [token_averaged_weights(p, mask) for p in cap.router_probs()]
                chunks.append(torch.stack(per_layer, dim=1).cpu())
    finally:
        model.train(was_training)
    rows = torch.stack([g.rows().float().cpu() for g in gates])
    return torch.cat(chunks), rows
