"""Diagnostic (round 4): cos / dot of each row's gradient with the target-set gradient at the scorer, clean vs corrupted.

    PYTHONPATH=src python bench/results/efficacy/lqs_alignment_diag.py SCORER_DIR ROWS KIND TARGET_PER_LEVEL"""
import importlib.util, sys, json
import numpy as np, torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("b", str(__import__("pathlib").Path(__file__).resolve().parents[2] / "efficacy.py")); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
from bridgerl.models import load_causal_lm, load_tokenizer
from bridgerl.data.lqs import per_sample_grad_stats, _mean_grad
from bridgerl.data.scorers import samples_from_prompt_lengths, to_token_batch, scoring_mode, split_params, make_loss_fns, loss_scores
from bridgerl.data.encoding import answer_samples
import transformers; transformers.logging.set_verbosity_error()
scorer, rows, kind, tpl = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
levels = ["tiny", "easy"]
train = b.level_rows(levels, rows // 2, b.DATA_SEED, "train")
train, bad = b.corrupt_rows(train, 0.2, b.DATA_SEED, kind)
taken = {r["prompt"] for r in train}
proxy = b.level_rows(levels, 1000, b.PROXY_SEED, "train", taken)
target = b.level_rows(levels, tpl, b.TARGET_SEED, "train", taken | {r["prompt"] for r in proxy})
tok, model = load_tokenizer(scorer), load_causal_lm(scorer)
S = samples_from_prompt_lengths(answer_samples(tok, train)); T = samples_from_prompt_lengths(answer_samples(tok, target))
loss = loss_scores(model, S, pad_id=tok.pad_token_id, progress=False)
with scoring_mode(model):
    theta, frozen = split_params(model, None)
    bl, sl = make_loss_fns(model, frozen)
    data = to_token_batch(S, tok.pad_token_id); tgt = to_token_batch(T, tok.pad_token_id)
    gJ, lJ = _mean_grad(bl, theta, tgt, 16)
    dots, norms = per_sample_grad_stats(sl, theta, data, gJ, 16)
    # also: J-gradient computed only from a *mean of clean train rows* (an in-distribution J)
dots, norms = dots.numpy(), norms.numpy()
cos = dots / norms / np.sqrt(sum(float((v.double()**2).sum()) for v in gJ.values()))
print("target loss", lJ, "loss clean/bad", loss[~bad].mean(), loss[bad].mean())
print("norm clean/bad", norms[~bad].mean(), norms[bad].mean())
print("dot clean/bad", dots[~bad].mean(), dots[bad].mean(), "AUC dot", b.auc(dots[~bad], dots[bad]))
print("cos clean/bad", cos[~bad].mean(), cos[bad].mean(), "AUC cos", b.auc(cos[~bad], cos[bad]))
print("AUC -norm", b.auc(-norms[~bad], -norms[bad]))
