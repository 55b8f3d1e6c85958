"""An endless, resumable stream of prompt batches over a fixed list of rows.

Each epoch's order is a pure function of (seed, epoch) — a fresh seeded permutation when
shuffling — so the whole state is (epoch, position): a resumed stream continues exactly
where it stopped without storing any RNG state or permutation.
"""
from __future__ import annotations

import hashlib
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = ["PromptSource", "PromptStream"]


class PromptSource(Protocol):
    """What the loop draws prompts from: batches of rows (each with a stable `id`), resumable."""

    def next_batch(self) -> list[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PromptStream:
    """Batches of rows, each a shallow copy with `id` = its index in `rows` (stable across epochs).

    - `order` given: the first epoch follows it and later epochs repeat it (it may be a
      subset of the rows, e.g. after data-efficacy selection; `shuffle` is then ignored).
    - otherwise, `shuffle=True`: a new seeded permutation every epoch; `shuffle=False`: row order.
    A batch that crosses an epoch boundary finishes one epoch and starts the next.
    A row's own `id` column, if any, is shadowed by the index in the emitted copy.
    """

    def __init__(self, rows: list[dict], batch_size: int, seed: int, order: Sequence[int] | None = None,
                 shuffle: bool = True):
        if not rows:
            raise ValueError("PromptStream needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        if order is not None:
            order_arr = np.asarray(order, dtype=np.int64).reshape(-1)
            if order_arr.size == 0:
                raise ValueError("order is empty: data selection kept no rows")
            bad = order_arr[(order_arr < 0) | (order_arr >= len(rows))]
            if bad.size:
                raise ValueError(f"order holds indices out of range for {len(rows)} rows, e.g. {bad[:5].tolist()}")
            self.order: np.ndarray | None = order_arr
        else:
            self.order = None
        self.epoch = 0
        self.position = 0
        self._epoch_order = self._order_for(0)
        self._fingerprint_cache: str | None = None

    @property
    def epoch_size(self) -> int:
        return len(self.order) if self.order is not None else len(self.rows)

    def __len__(self) -> int:
        """Batches per epoch (the last one may cross into the next epoch)."""
        return -(-self.epoch_size // self.batch_size)

    def _order_for(self, epoch: int) -> np.ndarray:
        if self.order is not None:
            return self.order
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next_batch(self) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        while len(batch) < self.batch_size:
            take = self._epoch_order[self.position:self.position + self.batch_size - len(batch)]
            batch.extend({**self.rows[i], "id": int(i)} for i in take.tolist())
            self.position += len(take)
            if self.position >= len(self._epoch_order):
                self.epoch += 1
                self.position = 0
                self._epoch_order = self._order_for(self.epoch)
        return batch

    def _fingerprint(self) -> str:
        """Identifies rows (their prompts), seed and ordering, so a resume on other data fails loudly."""
        if self._fingerprint_cache is None:
            h = hashlib.sha256(f"{len(self.rows)}|{self.seed}|{self.shuffle}".encode())
            for row in self.rows:
                h.update(repr(row.get("prompt")).encode("utf-8", "replace"))
            if self.order is not None:
                h.update(self.order.tobytes())
            self._fingerprint_cache = h.hexdigest()[:16]
        return self._fingerprint_cache

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows),
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError(
                f"the saved data stream was over {state.get('num_rows')} rows with seed {state.get('seed')}; "
                f"this one has {len(self.rows)} rows and seed {self.seed} (or a different order/shuffle). "
                "Resume with the same data, seed and data-efficacy settings")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._epoch_order = self._order_for(self.epoch)
