"""Supervised fine-tuning (loss on the completion only) and Bradley–Terry reward-model training.
Both write ordinary HF folders that `bridgerl train` loads back with from_pretrained."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RMConfig, SFTConfig
from ..models import load_causal_lm, load_tokenizer
from .setup import lr_lambda_for, pick_device, seed_everything


def sft_rows(cfg: SFTConfig) -> list[dict]:
    from ..data.formats import load_sft_rows
    from ..data.tasks import builtin_rows

    if cfg.data.train.startswith("builtin:"):
        rows = builtin_rows(cfg.data.train.removeprefix("builtin:"), cfg.data.num_train, cfg.seed, "train")
        for r in rows:
            if "solution" not in r:
                raise ValueError(f"built-in task {cfg.data.train} has no worked solutions to fine-tune on")
        return [dict(r, completion=r["solution"]) for r in rows]
    return load_sft_rows(cfg.data.train)


def encode_sft(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(prompt + completion + EOS token ids, prompt length) per row, truncated to max_length."""
    out = []
    for r in rows:
        messages = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        completion = tokenizer.encode(r["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append(((prompt + completion)[:max_length], len(prompt)))
    return out


def collate_sft(items: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a loss mask on the completion tokens."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    loss_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (seq, plen) in enumerate(items):
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        loss_mask[i, plen:len(seq)] = 1
    return ids.to(device), attn.to(device), loss_mask.to(device)


def completion_loss(model, ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over completion tokens."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    target, mask = ids[:, 1:], loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (nll.view_as(mask) * mask).sum() / mask.sum().clamp(min=1)


def sft(cfg: SFTConfig, order=None, progress: bool = True) -> Path:
    """Fine-tune and save to cfg.out_dir; `order` (row indices) replaces the seeded shuffle."""
    from ..data.stream import PromptStream

    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    model = load_causal_lm(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code, device=device)
    model.train()
    rows = sft_rows(cfg)
    encoded = encode_sft(tokenizer, rows, cfg.max_length)
    if order is None and cfg.data.efficacy is not None:
        from ..data.efficacy_config import efficacy_order_for_sft
        order = efficacy_order_for_sft(cfg, model, tokenizer, rows, encoded)
    stream = PromptStream([{"i": i} for i in range(len(encoded))], cfg.batch_size, seed=cfg.seed, order=order)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(o, cfg.steps))
    monitor = None
    if cfg.monitor.pathways is not None:
        from .monitoring import LiveMonitor
        monitor = LiveMonitor(cfg.monitor.pathways, tokenizer, rows)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "sft_metrics.jsonl").open("w")
    start = time.perf_counter()
    bar = _bar(cfg.steps, "sft", progress)
    for step in range(1, cfg.steps + 1):
        batch = [encoded[r["id"]] for r in stream.next_batch()]
        loss = completion_loss(model, *collate_sft(batch, tokenizer.pad_token_id, device))
        _descend(loss, model, optimizer, scheduler, o.grad_clip)
        record = monitor.maybe_measure(model, step) if monitor else {}
        if record or step % cfg.log_every == 0 or step == cfg.steps:
            record |= {"step": step, "loss": loss.item(), "time": time.perf_counter() - start}
            log.write(json.dumps(record) + "\n")
            log.flush()
        if bar:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    if bar:
        bar.close()
    log.close()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_reward_model(cfg: RMConfig, progress: bool = True) -> tuple[Path, dict]:
    """Bradley–Terry: maximise log σ(r(chosen) − r(rejected)); returns the folder and held-out accuracy."""
    from transformers import AutoModelForSequenceClassification

    from ..data.formats import load_preference_rows
    from ..data.tasks import builtin_rows

    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.path, num_labels=1, trust_remote_code=cfg.model.trust_remote_code).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.data.startswith("builtin:"):
        spec = cfg.data.removeprefix("builtin:")
        train_rows = builtin_rows(spec, cfg.num_train, cfg.seed, "train")
        test_rows = builtin_rows(spec, 200, cfg.seed, "test")
    else:
        rows = load_preference_rows(cfg.data)
        cut = max(1, len(rows) // 10)
        train_rows, test_rows = rows[cut:], rows[:cut]

    def texts(rows, side):
        return [tokenizer.apply_chat_template(
            (r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}])
            + [{"role": "assistant", "content": r[side]}], tokenize=False) for r in rows]

    def scores(batch_texts):
        enc = tokenizer(batch_texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_length,
                        add_special_tokens=False).to(device)
        return model(**enc).logits.squeeze(-1)

    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(o, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = _bar(cfg.steps, "reward model", progress)
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen).tolist()
        batch = [train_rows[i] for i in idx]
        r = scores(texts(batch, "chosen") + texts(batch, "rejected"))
        loss = -F.logsigmoid(r[:len(batch)] - r[len(batch):]).mean()
        _descend(loss, model, optimizer, scheduler, o.grad_clip)
        if bar:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    if bar:
        bar.close()
    model.eval()
    with torch.no_grad():
        chosen = torch.cat([scores(texts(test_rows[i:i + 64], "chosen")) for i in range(0, len(test_rows), 64)])
        rejected = torch.cat([scores(texts(test_rows[i:i + 64], "rejected")) for i in range(0, len(test_rows), 64)])
    metrics = {"rm/heldout_accuracy": (chosen > rejected).float().mean().item(), "rm/heldout_pairs": len(test_rows)}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "rm_metrics.json").write_text(json.dumps(metrics, indent=2))
    return out, metrics


def _descend(loss, model, optimizer, scheduler, grad_clip: float) -> None:
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None, mininterval=1.0)

