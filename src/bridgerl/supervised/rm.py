"""Bradley–Terry reward-model training on (prompt, chosen, rejected) rows. Writes an ordinary HF
sequence-classification folder that `rewards.tasks.<task>: {kind: model, path: ...}` loads."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RMConfig
from ..data.encoding import chat_messages
from ..models import load_tokenizer
from ..train.optim import build_optimizer, clip_and_step, pick_device, seed_everything
from .sft import progress_bar


def train_reward_model(cfg: RMConfig, progress: bool = True) -> tuple[Path, dict]:
    """Bradley–Terry: maximise log σ(r(chosen) − r(rejected)); returns the folder and held-out accuracy."""
    from transformers import AutoModelForSequenceClassification

    from ..data.formats import load_preference_rows
    from ..data.tasks import rows_from

    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.path, num_labels=1, trust_remote_code=cfg.model.trust_remote_code).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.data.startswith("builtin:"):
        train_rows = rows_from(cfg.data, cfg.num_train, cfg.seed, "train")
        test_rows = rows_from(cfg.data, 200, cfg.seed, "test")
    else:
        rows = load_preference_rows(cfg.data)
        cut = max(1, len(rows) // 10)
        train_rows, test_rows = rows[cut:], rows[:cut]

    def texts(rows, side):
        return [tokenizer.apply_chat_template(
            chat_messages(r["prompt"]) + [{"role": "assistant", "content": r[side]}], tokenize=False) for r in rows]

    def scores(batch_texts):
        enc = tokenizer(batch_texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_length,
                        add_special_tokens=False).to(device)
        return model(**enc).logits.squeeze(-1)

    o = cfg.optim
    params = list(model.parameters())
    optimizer, scheduler = build_optimizer(params, o, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(cfg.steps, "reward model", progress)
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen).tolist()
        batch = [train_rows[i] for i in idx]
        r = scores(texts(batch, "chosen") + texts(batch, "rejected"))
        loss = -F.logsigmoid(r[:len(batch)] - r[len(batch):]).mean()
        loss.backward()
        clip_and_step(params, optimizer, scheduler, o.grad_clip)
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
