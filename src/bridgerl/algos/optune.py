"""OPTune: selective regeneration of low-reward prompts + utility-weighted DPO (algorithms.md §2).

Pure parts, no model or config inside:

- `PairPool`: one stored (chosen, rejected) pair per prompt, with rewards and the weights
  version that produced each side; survives checkpoints via `state_dict()`.
- Selection: `selection_keys` + `select_for_regeneration` (the ⌈ρ|P|⌉ lowest keys) and the
  `select_random` baseline at the same count; `select_prompts` dispatches on the config's key.
- Merge: `merge_candidates` picks (argmax, argmin) over new samples ∪ the old pair.
- wDPO: `pair_weights` (mean-1, detached, non-decreasing in the gap) and `OPTuneObjective`, which
  trains DPO's loss with those weights (`dpo_loss(..., weights=...)`) rather than restating it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch


PromptId = Union[int, str]
# A completion as the loop stores it: text, token ids, or a small dict of both
# (e.g. {"text": ..., "token_ids": [...]}); kept JSON-serialisable.
Payload = Union[str, list, dict]

SELECTION_KEYS = ("chosen_reward", "reward_gap")
SELECTION_KINDS = SELECTION_KEYS + ("random",)
WEIGHT_SCHEMES = ("softmax", "sigmoid", "linear")
GAP_NORMALIZATIONS = ("zscore", "mean", "none")
_STATE_FORMAT = 1


# ----------------------------------------------------------------------------- pool


def _as_prompt_id(prompt_id: Any) -> PromptId:
    # bool is an int subclass; True as a prompt id is almost surely a bug.
    if isinstance(prompt_id, bool):
        raise TypeError("prompt_id must be an int or str, got a bool")
    if isinstance(prompt_id, str):
        return prompt_id
    if isinstance(prompt_id, (int, np.integer)):
        return int(prompt_id)
    if isinstance(prompt_id, torch.Tensor) and prompt_id.numel() == 1 and not prompt_id.is_floating_point():
        return int(prompt_id.item())
    raise TypeError(f"prompt_id must be an int or str, got {type(prompt_id).__name__}")


def _as_payload(value: Any) -> Payload:
    """Normalise a completion to JSON-friendly Python (tensors/arrays become lists of ints)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be a 1-D integer tensor/array, got shape {arr.shape} {arr.dtype}")
        return [int(t) for t in arr]
    if isinstance(value, (list, tuple)):
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value):
            raise TypeError("a completion given as a list must be token ids (ints)")
        return [int(t) for t in value]
    if isinstance(value, Mapping):
        return {str(k): _as_payload(v) for k, v in value.items()}
    raise TypeError(
        f"a completion must be text (str), token ids (list/1-D int tensor) or a dict of those, "
        f"got {type(value).__name__}"
    )


@dataclass(frozen=True)
class PairEntry:
    """One prompt's stored pair. `version_*` is the weights version that generated that side."""

    prompt_id: PromptId
    chosen: Payload
    rejected: Payload
    r_chosen: float
    r_rejected: float
    version_chosen: int
    version_rejected: int
    prompt: Any = field(default=None)

    @property
    def gap(self) -> float:
        return self.r_chosen - self.r_rejected

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt_id, "chosen": self.chosen, "rejected": self.rejected,
            "r_chosen": self.r_chosen, "r_rejected": self.r_rejected,
            "version_chosen": self.version_chosen, "version_rejected": self.version_rejected,
            "prompt": self.prompt,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "PairEntry":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class PairPool:
    """One (chosen, rejected) pair per prompt id, in insertion order (which survives `state_dict`)."""

    def __init__(self) -> None:
        self._entries: dict[PromptId, PairEntry] = {}

    def update(
        self,
        prompt_id: PromptId,
        chosen: Any,
        rejected: Any,
        r_chosen: float,
        r_rejected: float,
        version: int | tuple[int, int],
        prompt: Any = None,
    ) -> PairEntry:
        """Store (or replace) a prompt's pair. `version` is one int or (chosen's, rejected's)."""
        pid = _as_prompt_id(prompt_id)
        r_c, r_r = float(r_chosen), float(r_rejected)
        if not (math.isfinite(r_c) and math.isfinite(r_r)):
            raise ValueError(f"prompt {pid!r}: rewards must be finite, got chosen={r_c}, rejected={r_r}")
        if r_c < r_r:
            raise ValueError(
                f"prompt {pid!r}: r_chosen={r_c} < r_rejected={r_r}; swap chosen and rejected "
                "(OPTune requires r(y_w) >= r(y_l))"
            )
        v_c, v_r = (version, version) if isinstance(version, (int, np.integer)) else version
        if prompt is None and pid in self._entries:
            prompt = self._entries[pid].prompt  # keep the prompt across regenerations
        entry = PairEntry(pid, _as_payload(chosen), _as_payload(rejected), r_c, r_r, int(v_c), int(v_r), prompt)
        self._entries[pid] = entry
        return entry

    def get(self, prompt_id: PromptId, default: Any = None) -> PairEntry | Any:
        return self._entries.get(_as_prompt_id(prompt_id), default)

    def __getitem__(self, prompt_id: PromptId) -> PairEntry:
        return self._entries[_as_prompt_id(prompt_id)]

    def __contains__(self, prompt_id: object) -> bool:
        try:
            return _as_prompt_id(prompt_id) in self._entries
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[PairEntry]:
        return iter(list(self._entries.values()))

    def prompt_ids(self) -> list[PromptId]:
        return list(self._entries)

    def merge_many(
        self,
        prompt_ids: Sequence[PromptId],
        completions: Sequence[Sequence[Any]],  # [P][N]
        rewards: torch.Tensor | Sequence[Sequence[float]],  # [P, N]; NaN marks a missing sample
        version: int,
        prompts: Sequence[Any] | None = None,
    ) -> list[PairEntry]:
        """Vectorised `merge` over P prompts (new prompts simply pair their new samples)."""
        pids = [_as_prompt_id(p) for p in prompt_ids]
        new = torch.as_tensor(rewards, dtype=torch.float64)
        if new.ndim != 2 or new.shape[0] != len(pids) or len(completions) != len(pids):
            raise ValueError(
                f"merge_many needs rewards [P, N] and P completion lists for P={len(pids)} prompts; "
                f"got rewards {tuple(new.shape)} and {len(completions)} completion lists"
            )
        if len(set(pids)) != len(pids):
            raise ValueError("merge_many got the same prompt id twice; merge each prompt once per round")
        nan = float("nan")
        stored = [self._entries.get(pid) for pid in pids]
        old = torch.tensor([[nan, nan] if e is None else [e.r_chosen, e.r_rejected] for e in stored],
                           dtype=torch.float64).reshape(len(pids), 2)
        chosen, rejected = merge_candidates(new, old)
        n, new_list = new.shape[1], new.tolist()
        out = []
        for row, (pid, c_idx, r_idx) in enumerate(zip(pids, chosen.tolist(), rejected.tolist())):
            sides = []
            for idx in (c_idx, r_idx):
                if idx < n:
                    sides.append((completions[row][idx], new_list[row][idx], version))
                else:  # idx n is the old chosen, n+1 the old rejected
                    e = stored[row]
                    sides.append((e.chosen, e.r_chosen, e.version_chosen) if idx == n
                                 else (e.rejected, e.r_rejected, e.version_rejected))
            (c, r_c, v_c), (r, r_r, v_r) = sides
            out.append(self.update(pid, c, r, r_c, r_r, (v_c, v_r),
                                   prompt=None if prompts is None else prompts[row]))
        return out

    def stats(self, current_version: int | None = None) -> dict[str, float]:
        """Pool summary for the logger; staleness = current_version − the version of each side."""
        if not self._entries:
            return {"optune/pool_size": 0.0, "optune/pool_pairs": 0.0}
        r_c = np.array([e.r_chosen for e in self._entries.values()])
        gaps = np.array([e.gap for e in self._entries.values()])
        m = {
            "optune/pool_size": float(len(self._entries)),
            "optune/pool_pairs": float((gaps > 0).sum()),
            "optune/pool_chosen_reward_mean": float(r_c.mean()),
            "optune/pool_gap_mean": float(gaps.mean()),
        }
        if current_version is not None:
            versions = np.array([[e.version_chosen, e.version_rejected] for e in self._entries.values()])
            m["optune/pool_staleness_mean"] = float((current_version - versions).mean())
            m["optune/pool_staleness_max"] = float((current_version - versions).max())
        return m

    def state_dict(self) -> dict:
        """JSON- and torch.save-serialisable; a list keeps insertion order and int vs str ids."""
        return {"format": _STATE_FORMAT, "entries": [e.to_dict() for e in self._entries.values()]}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"PairPool state has format {state.get('format')!r}; this version reads {_STATE_FORMAT}")
        entries = [PairEntry.from_dict(d) for d in state["entries"]]
        self._entries = {_as_prompt_id(e.prompt_id): e for e in entries}


# ------------------------------------------------------------------------ selection


def regeneration_count(n_prompts: int, rho: float) -> int:
    """⌈ρ·|P|⌉, computed on the decimal ρ as written so that 0.3·10 is 3, not 4."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1] (fraction of prompts to regenerate), got {rho}")
    return math.ceil(Fraction(repr(float(rho))) * n_prompts)


def selection_keys(pool: PairPool, key: str = "chosen_reward") -> dict[PromptId, float]:
    """Per-prompt ranking key: the stored chosen reward [PROPOSED, §2] or the reward gap."""
    if key == "chosen_reward":
        return {e.prompt_id: e.r_chosen for e in pool}
    if key == "reward_gap":
        return {e.prompt_id: e.gap for e in pool}
    raise ValueError(f"unknown OPTune selection key {key!r}; choose one of {SELECTION_KEYS}")


def _ids_and_keys(keys: Any, prompt_ids: Sequence[PromptId] | None) -> tuple[list, np.ndarray]:
    if isinstance(keys, Mapping):
        if prompt_ids is not None:
            raise ValueError("pass prompt_ids only with array keys; a dict already maps id -> key")
        ids, vals = list(keys.keys()), list(keys.values())
    else:
        vals = keys.detach().cpu().numpy() if isinstance(keys, torch.Tensor) else keys
        vals = list(np.asarray(vals, dtype=np.float64).reshape(-1))
        ids = list(range(len(vals))) if prompt_ids is None else list(prompt_ids)
        if len(ids) != len(vals):
            raise ValueError(f"{len(ids)} prompt ids for {len(vals)} keys")
    arr = np.asarray(vals, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("selection keys contain NaN; score every prompt before selecting")
    return ids, arr


def select_for_regeneration(
    keys: Mapping[PromptId, float] | torch.Tensor | np.ndarray | Sequence[float],
    rho: float,
    prompt_ids: Sequence[PromptId] | None = None,
) -> list[PromptId]:
    """The ⌈ρ·|P|⌉ prompt ids with the lowest key, lowest first.

    Ties keep input order (a stable sort), so the choice is deterministic; for a dict or a pool
    that is insertion order. Array keys without `prompt_ids` return positions.
    """
    ids, arr = _ids_and_keys(keys, prompt_ids)
    k = regeneration_count(len(ids), rho)
    order = np.argsort(arr, kind="stable")[:k]
    return [ids[i] for i in order]


def select_random(prompt_ids: Sequence[PromptId], rho: float, seed: int) -> list[PromptId]:
    """Baseline: ⌈ρ·|P|⌉ prompt ids uniformly without replacement, returned in input order."""
    ids = list(prompt_ids)
    k = regeneration_count(len(ids), rho)
    picked = np.random.default_rng(seed).choice(len(ids), size=k, replace=False)
    return [ids[i] for i in np.sort(picked)]


def select_prompts(pool: PairPool, rho: float, key: str = "chosen_reward", seed: int = 0,
                   among: Sequence[PromptId] | None = None) -> list[PromptId]:
    """What the loop calls each step: ⌈ρ·|P|⌉ of the pool's prompts (or of those `among` them, e.g. the
    batch's stored prompts), by `key` = chosen_reward | reward_gap | random."""
    ids = pool.prompt_ids() if among is None else [i for i in among if i in pool]
    if key == "random":
        return select_random(ids, rho, seed)
    keys = selection_keys(pool, key)
    return select_for_regeneration({i: keys[i] for i in ids}, rho)


# ---------------------------------------------------------------------------- merge


def merge_candidates(
    new_rewards: torch.Tensor | Sequence[float],
    old_pair: torch.Tensor | Sequence[float] | None = None,
) -> tuple[Any, Any]:
    """(chosen, rejected) indices over the pool new samples ∪ {old chosen, old rejected} [PROPOSED].

    Per prompt: new_rewards [N], old_pair (r_chosen, r_rejected) or None → two ints.
    Vectorised: new_rewards [P, N], old_pair [P, 2] or None → two LongTensors [P].
    Index i < N is new sample i, N the old chosen, N+1 the old rejected. NaN marks an absent
    member (a prompt with no stored pair, or padding). Ties go to the lowest index, so a new
    sample wins a tie with the old pair (fresher weights). Rejected is the argmin over the pool
    without the chosen one, so the two differ whenever the pool has two members.
    """
    new = torch.as_tensor(new_rewards, dtype=torch.float64)
    single = new.ndim == 1
    new = new[None] if single else new
    if old_pair is None:
        pool = new
    else:
        old = torch.as_tensor(old_pair, dtype=torch.float64)
        pool = torch.cat([new, old[None] if single else old], dim=1)
    if new.ndim != 2 or pool.shape[1] != new.shape[1] + (0 if old_pair is None else 2):
        raise ValueError(f"new_rewards must be [N] or [P, N] and old_pair [2] or [P, 2]; got {tuple(pool.shape)}")
    present = ~torch.isnan(pool)
    if torch.isinf(pool).any():
        raise ValueError("rewards must be finite; map failures to a finite failure value first")
    n_present = present.sum(dim=1)
    if (n_present == 0).any():
        raise ValueError("a prompt has no rewards at all (all NaN); give it at least one scored sample")
    chosen = torch.where(present, pool, -math.inf).argmax(dim=1)
    others = torch.where(present, pool, math.inf).scatter(1, chosen[:, None], math.inf)
    rejected = torch.where(n_present >= 2, others.argmin(dim=1), chosen)
    if single:
        return int(chosen[0]), int(rejected[0])
    return chosen, rejected


# ----------------------------------------------------------------------------- wDPO


def _normalize_gaps(g: torch.Tensor, normalize: str) -> torch.Tensor:
    scale = g.abs().max()
    if normalize == "zscore":
        std = g.std(unbiased=False)
        # Gaps equal up to rounding (e.g. differences of the same rewards) must read as equal,
        # not as ±1 z-scores of noise.
        if std <= 1e-9 * scale or scale == 0:
            return torch.zeros_like(g)
        return (g - g.mean()) / std
    if normalize == "mean":
        return g / g.mean() if g.mean() > 0 else torch.zeros_like(g)
    if normalize == "none":
        return g
    raise ValueError(f"unknown gap normalisation {normalize!r}; choose one of {GAP_NORMALIZATIONS}")


def pair_weights(
    gaps: torch.Tensor | Sequence[float],  # [B] reward gaps r(y_w) − r(y_l) ≥ 0
    beta2: float = 1.0,
    scheme: str = "softmax",
    normalize: str = "zscore",
) -> torch.Tensor:
    """Per-pair wDPO weights: detached, > 0, mean 1, non-decreasing in the gap.

    With ĝ the normalised gaps: "softmax" w = B·softmax(β₂ĝ) [PROPOSED, §2];
    "sigmoid" w ∝ σ(β₂ĝ) (bounded: no pair gets more than 1/mean σ);
    "linear" w ∝ 1 + β₂(ĝ − min ĝ) (with normalize="mean" and a zero-gap pair in the batch this
    is 1 + β₂·g/mean g). β₂ = 0, equal gaps or a batch of one give exactly ones.
    """
    g_in = torch.as_tensor(gaps)
    out_dtype = g_in.dtype if g_in.is_floating_point() else torch.get_default_dtype()
    g = g_in.detach().to(torch.float64).reshape(-1)
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown wDPO weighting {scheme!r}; choose one of {WEIGHT_SCHEMES}")
    if beta2 < 0 or not math.isfinite(beta2):
        raise ValueError(f"beta2 must be finite and >= 0 (weights must grow with the gap), got {beta2}")
    if torch.isnan(g).any() or (g < 0).any():
        raise ValueError("reward gaps must be >= 0 and not NaN (chosen reward >= rejected reward)")
    ones = torch.ones(g.shape, dtype=out_dtype, device=g_in.device)
    if g.numel() <= 1 or beta2 == 0:
        return ones
    z = _normalize_gaps(g, normalize)
    if bool((z == z[0]).all()):
        return ones
    if scheme == "softmax":
        w = g.numel() * torch.softmax(beta2 * z, dim=0)
    elif scheme == "sigmoid":
        s = torch.sigmoid(beta2 * z)
        w = s / s.mean()
    else:
        lin = 1.0 + beta2 * (z - z.min())
        w = lin / lin.mean()
    # A huge β₂·spread can underflow a weight to 0 in float32; keep it strictly positive.
    w = w.to(out_dtype).clamp_min(torch.finfo(out_dtype).tiny)
    return w.to(g_in.device)


class OPTuneObjective:
    """wDPO on the pool's pairs: the loop hands it groups of 2 (stored chosen, stored rejected), so DPO's
    pairing keeps every pair with a gap; each pair is weighted by `pair_weights` of its gap."""

    passes = 1
    needs_reference = True

    def __init__(self, cfg):
        from .dpo import DPOObjective

        self.cfg, self.dpo = cfg.optune, DPOObjective(cfg)

    def make_batch(self, rollouts, rewards: torch.Tensor, ctx):
        batch = self.dpo.make_batch(rollouts, rewards, ctx)
        if batch.empty:
            return batch
        gaps = torch.cat([m.gaps for m in batch.micro])
        beta2 = self.cfg.beta2 if self.cfg.weighting != "none" else 0.0
        scheme = self.cfg.weighting if self.cfg.weighting != "none" else "softmax"
        weights = pair_weights(gaps.double(), beta2, scheme, self.cfg.normalize).float()
        for m, w in zip(batch.micro, weights.split([len(m.gaps) for m in batch.micro])):
            m.weights = w.to(m.ref_logps.device)
        batch.metrics |= {"optune/mean_weight": weights.mean().item(), "optune/weight_max": weights.max().item(),
                          "optune/gap_mean": gaps.mean().item()}
        return batch

    def loss(self, policy: torch.nn.Module, micro):
        return self.dpo.loss(policy, micro)


# ---------------------------------------------------------------------------- stats


def regeneration_stats(
    n_prompts: int,
    n_regenerated: int,
    n_samples: int,
    generated_tokens: int,
    merged: Sequence[PairEntry] = (),
    version: int | None = None,
) -> dict[str, float]:
    """Cost of one regeneration round for the logger; the loop supplies the counts.

    With `merged` (what `merge_many` returned) and the round's `version`, also counts how many
    pairs took a new chosen / rejected sample.
    """
    m = {
        "optune/prompts_regenerated": float(n_regenerated),
        "optune/regenerated_fraction": n_regenerated / n_prompts if n_prompts else 0.0,
        "optune/generations": float(n_regenerated * n_samples),
        "optune/generated_tokens": float(generated_tokens),
    }
    if merged and version is not None:
        m["optune/chosen_replaced"] = float(sum(e.version_chosen == version for e in merged))
        m["optune/rejected_replaced"] = float(sum(e.version_rejected == version for e in merged))
    return m
