"""Supervised fine-tuning: next-token loss on the completion only. Writes an ordinary HF folder that
`bridgerl train` loads back with from_pretrained (the seed policy of an RL run)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import SFTConfig
from ..data.encoding import encode_sft, pad
from ..models import load_causal_lm, load_tokenizer
from ..train.optim import build_optimizer, clip_and_step, pick_device, seed_everything


def sft_rows(cfg: SFTConfig) -> list[dict]:
    from ..data.formats import load_sft_rows
    from ..data.tasks import rows_from

    rows = rows_from(cfg.data.train, cfg.data.num_train, cfg.seed, "train", load_sft_rows)
    if cfg.data.train.startswith("builtin:"):
        for r in rows:
            if "solution" not in r:
                raise ValueError(f"built-in task {cfg.data.train} has no worked solutions to fine-tune on")
        return [dict(r, completion=r["solution"]) for r in rows]
    return rows


def collate_sft(items: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a loss mask on the completion tokens."""
    ids, attn = pad([seq for seq, _ in items], pad_id, "right")
    prompt_lengths = torch.tensor([plen for _, plen in items])
    loss_mask = attn * (torch.arange(ids.shape[1])[None, :] >= prompt_lengths[:, None])
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
        from ..data.delt import efficacy_order_for_sft
        order = efficacy_order_for_sft(cfg, model, tokenizer, rows, encoded)
    stream = PromptStream([{"i": i} for i in range(len(encoded))], cfg.batch_size, seed=cfg.seed, order=order)
    o = cfg.optim
    params = list(model.parameters())
    optimizer, scheduler = build_optimizer(params, o, cfg.steps)
    monitor = None
    if cfg.monitor.pathways is not None:
        from ..monitor.live import LiveMonitor
        monitor = LiveMonitor(cfg.monitor.pathways, tokenizer, rows)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "sft_metrics.jsonl").open("w")
    start = time.perf_counter()
    bar = progress_bar(cfg.steps, "sft", progress)
    for step in range(1, cfg.steps + 1):
        batch = [encoded[r["id"]] for r in stream.next_batch()]
        loss = completion_loss(model, *collate_sft(batch, tokenizer.pad_token_id, device))
        loss.backward()
        clip_and_step(params, optimizer, scheduler, o.grad_clip)
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


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None, mininterval=1.0)

