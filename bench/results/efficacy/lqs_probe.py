"""Probe (round 4): one warmed scorer, several LQS settings, AUC of clean-above-corrupted rows.

    PYTHONPATH=src python bench/results/efficacy/lqs_probe.py SCORER_DIR ROWS KIND '[{...lqs_scores kwargs, target_per_level}]'
SCORER_DIR is a `scorer/` folder a `bench/efficacy.py --check-only --rows ROWS` run left in its --out."""
import importlib.util, sys, time, json
import numpy as np, torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("b", str(__import__("pathlib").Path(__file__).resolve().parents[2] / "efficacy.py")); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
from bridgerl.models import load_causal_lm, load_tokenizer
from bridgerl.data.lqs import lqs_scores
from bridgerl.data.scorers import samples_from_prompt_lengths, loss_scores
from bridgerl.data.encoding import answer_samples
import transformers; transformers.logging.set_verbosity_error()
scorer, rows, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
variants = json.loads(sys.argv[4])
levels = ["tiny", "easy"]
train = b.level_rows(levels, rows // 2, b.DATA_SEED, "train")
train, bad = b.corrupt_rows(train, 0.2, b.DATA_SEED, kind)
taken = {r["prompt"] for r in train}
proxy = b.level_rows(levels, 1000, b.PROXY_SEED, "train", taken)
tok, model = load_tokenizer(scorer), load_causal_lm(scorer)
S = samples_from_prompt_lengths(answer_samples(tok, train))
loss = loss_scores(model, S, pad_id=tok.pad_token_id, progress=False)
print("loss AUC", round(b.auc(-loss[~bad], -loss[bad]), 3), flush=True)
for v in variants:
    tpl = v.pop("target_per_level", 16)
    target = b.level_rows(levels, tpl, b.TARGET_SEED, "train", taken | {r["prompt"] for r in proxy})
    T = samples_from_prompt_lengths(answer_samples(tok, target))
    kw = dict(steps=20, lr=8e-3, batch_size=16, score_every=10); kw.update(v)
    c = time.perf_counter()
    res = lqs_scores(model, S, T, pad_id=tok.pad_token_id, seed=1000, progress=False, **kw)
    s = res.raw
    print(json.dumps(v), f"target/level {tpl}", "LQS AUC", round(b.auc(s[~bad], s[bad]), 3),
          "lam", [round(x, 2) for x in res.metrics["lqs/lambda_norms"]], "proxy loss", round(res.metrics["lqs/train_loss_first"],3), round(res.metrics["lqs/train_loss_last"],3), "zAUC", round(b.auc(res.scores[~bad], res.scores[bad]),3), f"{time.perf_counter()-c:.0f}s", flush=True)
