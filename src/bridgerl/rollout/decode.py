"""One decode step of the sampler: the next-token logits of every live row, given its last token.

Two implementations behind one interface (`step`, `keep`):

- `HFDecode` calls the model's own forward with its KV cache: any causal LM works.
- `FastDecode` runs Llama-family decoder layers (Llama, SmolLM2, Qwen2 with full attention) as plain
  torch ops over a preallocated KV buffer. A transformers forward spends most of a small model's
  decode step in Python: per-call decorators, mask building, cache bookkeeping and module calls.
  Here a step is the arithmetic alone (RoPE on q and k at once, one SDPA per layer, residuals as
  addmm), and the logits equal the HF forward's to float rounding (tests/test_generation.py
  checks both architectures with left padding and rows leaving the batch; on SmolLM2-135M the
  greedy tokens are identical).

Prefill always goes through the HF forward; only the token-by-token loop is replaced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init (no per-call rescaling)


class HFDecode:
    def __init__(self, model, cache, mask: torch.Tensor):
        self.model, self.cache, self.mask = model, cache, mask

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]

    def step(self, tok: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tok), 1)], dim=1)
        out = self.model(input_ids=tok[:, None], attention_mask=self.mask, position_ids=positions[:, None],
                         past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()


def fast_decode_supported(model) -> bool:
    """Llama / Qwen2 causal LMs with plain linear layers, full attention and a static RoPE."""
    if type(model).__name__ not in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        return False
    cfg, inner = model.config, model.model
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(cfg, "use_sliding_window", False) or cfg._attn_implementation not in ("sdpa", "eager"):
        return False
    if getattr(inner.rotary_emb, "rope_type", None) not in STATIC_ROPE:
        return False
    linears = [model.lm_head] + [m for layer in inner.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    return all(type(m) is torch.nn.Linear for m in linears)  # LoRA-wrapped or quantised layers: HF path


class _Layer:
    """One decoder layer's weights, read in place (no copies: the weights change between calls).
    Fusing q/k/v and gate/up into single matmuls was measured too: no faster per step on the
    tiny models, and the weight copy per generate call made SmolLM2-135M slower."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_parts = [(m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        self.gate, self.up = (mlp.gate_proj.weight, mlp.gate_proj.bias), (mlp.up_proj.weight, mlp.up_proj.bias)
        self.o_t, self.o_b = attn.o_proj.weight.t(), attn.o_proj.bias
        self.down_t, self.down_b = mlp.down_proj.weight.t(), mlp.down_proj.bias
        self.act = mlp.act_fn
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon

    def qkv(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(h, w, b) for w, b in self.qkv_parts], dim=-1)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(h, *self.gate)) * F.linear(h, *self.up)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()  # HF's order for half precision: normalise in fp32, cast, then scale
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _project_add(x: torch.Tensor, h: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x + h @ W^T (+ b) as one addmm."""
    out = torch.addmm(x, h, w_t)
    return out if b is None else out + b


class FastDecode:
    """Decode over a KV buffer [rows, kv_heads, prompt + max_new, head_dim] per layer, filled from
    the HF prefill cache; `mask` [rows, prompt + max_new] marks the keys each row may attend to."""

    def __init__(self, model, cache, prompt_mask: torch.Tensor, max_new_tokens: int, repeat: int = 1):
        cfg, inner = model.config, model.model
        self.embed, self.lm_head = inner.embed_tokens.weight, model.lm_head
        self.final_norm, self.final_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.inv_freq, self.rope_scale = inner.rotary_emb.inv_freq, inner.rotary_emb.attention_scaling
        P = prompt_mask.shape[1]
        self.keys, self.values = [], []
        for layer in cache.layers:
            k, v = layer.keys.repeat_interleave(repeat, dim=0), layer.values.repeat_interleave(repeat, dim=0)
            kb = k.new_zeros(k.shape[0], k.shape[1], P + max_new_tokens, k.shape[3])
            vb = torch.zeros_like(kb)
            kb[:, :, :P], vb[:, :, :P] = k, v
            self.keys.append(kb)
            self.values.append(vb)
        self.mask = torch.cat([prompt_mask.repeat_interleave(repeat, dim=0).bool(),
                               prompt_mask.new_zeros(len(prompt_mask) * repeat, max_new_tokens, dtype=torch.bool)], dim=1)
        self.filled = P  # key slots written so far (the same for every row)

    def keep(self, rows: torch.Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.mask = self.mask[rows]

    @torch.no_grad()
    def step(self, tok: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, H, KV, D = len(tok), self.heads, self.kv_heads, self.head_dim
        slot = self.filled
        self.filled += 1
        self.mask[:, slot] = True
        attend = self.mask[:, None, None, :slot + 1]
        x = F.embedding(tok, self.embed)  # [B, hidden]
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype)[:, None, :]
        sin = (emb.sin() * self.rope_scale).to(x.dtype)[:, None, :]
        QK, half = H + KV, D // 2
        for i, w in enumerate(self.layers):
            qkv = w.qkv(_rms_norm(x, w.norm1, w.eps1)).view(B, QK + KV, D)
            qk = qkv[:, :QK]  # RoPE on q and k at once: x·cos + rotate_half(x)·sin
            qk = torch.addcmul(qk * cos, torch.cat([-qk[..., half:], qk[..., :half]], dim=-1), sin)
            self.keys[i][:, :, slot] = qk[:, H:]
            self.values[i][:, :, slot] = qkv[:, QK:]
            out = F.scaled_dot_product_attention(qk[:, :H, None], self.keys[i][:, :, :slot + 1],
                                                 self.values[i][:, :, :slot + 1], attn_mask=attend,
                                                 enable_gqa=H != KV)
            x = _project_add(x, out.view(B, H * D), w.o_t, w.o_b)
            x = _project_add(x, w.mlp(_rms_norm(x, w.norm2, w.eps2)), w.down_t, w.down_b)
        return self.lm_head(_rms_norm(x, self.final_norm, self.final_eps)).float()
