"""Rows of fixed length from variable-length examples: first-fit packing or padding to buckets.

Both produce the batch contract of architecture.md ("Data"): tokens, targets, loss_mask,
rto_mask, segment_ids (1, 2, ... per example in the row, 0 = padding) and positions (restarting
at 0 for every example). Each example's targets were computed inside the example (`tokenize.py`),
so no target crosses a segment boundary; the model's mask (same segment, pos[j] <= pos[i]) keeps
attention inside an example.

Packing uses grain's `FirstFitPackIterDataset` (it checkpoints with the iterator): `num_bins`
rows are filled first-fit in arrival order and emitted together when an example fits in none.
"""
from __future__ import annotations

from typing import Sequence

import grain
import grain.experimental as grain_exp
import numpy as np

FEATURES = ("tokens", "targets", "loss_mask", "rto_mask")
BATCH_KEYS = FEATURES + ("segment_ids", "positions")


def _to_contract(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: row[k] for k in FEATURES}
    out["segment_ids"] = row["tokens_segment_ids"].astype(np.int32)
    out["positions"] = row["tokens_positions"].astype(np.int32)
    out["loss_mask"] = out["loss_mask"].astype(bool)
    out["rto_mask"] = out["rto_mask"].astype(bool)
    return out


def pack(examples: grain.IterDataset, seq_len: int, batch_size: int, num_bins: int | None = None,
         seed: int = 0) -> grain.IterDataset:
    """Packed batches [batch_size, seq_len] from an IterDataset of per-example feature dicts."""
    packed = grain_exp.FirstFitPackIterDataset(
        examples, length_struct={k: seq_len for k in FEATURES}, num_packing_bins=num_bins or batch_size,
        seed=seed, shuffle_bins=False)
    return packed.map(_to_contract).batch(batch_size, drop_remainder=True)


def pad_batch(examples: Sequence[dict[str, np.ndarray]], bucket_lengths: Sequence[int]
              ) -> dict[str, np.ndarray]:
    """One example per row, padded to the smallest bucket length that holds the longest one."""
    longest = max(len(e["tokens"]) for e in examples)
    fitting = [b for b in sorted(bucket_lengths) if b >= longest]
    if not fitting:
        raise ValueError(f"an example of {longest} tokens fits no bucket of {sorted(bucket_lengths)}")
    length = fitting[0]
    out = {k: np.zeros((len(examples), length), bool if k.endswith("mask") else np.int32)
           for k in BATCH_KEYS}
    for row, e in enumerate(examples):
        n = len(e["tokens"])
        for k in FEATURES:
            out[k][row, :n] = e[k]
        out["segment_ids"][row, :n] = 1
        out["positions"][row, :n] = np.arange(n)
    return out


def pad_to_buckets(examples: grain.IterDataset, batch_size: int, bucket_lengths: Sequence[int]
                   ) -> grain.IterDataset:
    return examples.batch(batch_size, drop_remainder=True,
                          batch_fn=lambda es: pad_batch(es, bucket_lengths))


def non_pad_share(batch: dict[str, np.ndarray]) -> float:
    """Share of the batch's token slots that hold a real token (segment id != 0)."""
    return float(np.mean(batch["segment_ids"] != 0))
