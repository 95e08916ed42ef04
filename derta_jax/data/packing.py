"""Rows of fixed length from variable-length examples: first-fit-decreasing packing or padding.

Both produce the batch contract of architecture.md ("Data"): tokens, targets, loss_mask,
rto_mask, segment_ids (1, 2, ... per example in the row, 0 = padding) and positions (restarting
at 0 for every example). Each example's targets were computed inside the example (`tokenize.py`),
so no target crosses a segment boundary; the model's mask (same segment, pos[j] <= pos[i]) keeps
attention inside an example.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

FEATURES = ("tokens", "targets", "loss_mask", "rto_mask")
BATCH_KEYS = FEATURES + ("segment_ids", "positions")
Example = dict[str, np.ndarray]  # one example's [n] arrays (tokenize.materialize)


def first_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) of total length <= seq_len: the longest first, each
    into the first bin with room. Deterministic: ties keep their order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"an example of {n} tokens does not fit a row of {seq_len}")
        b = next((j for j, r in enumerate(room) if r >= n), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(seq_len)
        bins[b].append(i)
        room[b] -= n
    return bins


def fill_rows(examples: Sequence[Example], bins: Sequence[Sequence[int]], rows: int,
              length: int) -> dict[str, np.ndarray]:
    """A [rows, length] batch: row r holds examples bins[r] one after the other; the rest is padding.

    An example with `pieces` (a preference pair: 0 chosen, 1 rejected) takes one segment per
    piece, so pair j of a row of pairs is segments 2j + 1 (chosen) and 2j + 2 (rejected), and its
    `positions` restart per piece. `ref_logps` (float32) is carried when the examples have it.
    """
    if len(bins) > rows:
        raise ValueError(f"{len(bins)} rows of examples do not fit a batch of {rows} rows")
    copied = FEATURES + (("ref_logps",) if examples and "ref_logps" in examples[0] else ())
    out = {k: np.zeros((rows, length), bool if k.endswith("mask") else
                       np.float32 if k == "ref_logps" else np.int32)
           for k in copied + ("segment_ids", "positions")}
    for r, members in enumerate(bins):
        offset, segment = 0, 0
        for i in members:
            e = examples[i]
            n = len(e["tokens"])
            if offset + n > length:
                raise ValueError(f"examples of {offset + n} tokens do not fit a row of {length}")
            sl = slice(offset, offset + n)
            for k in copied:
                out[k][r, sl] = e[k]
            pieces = e.get("pieces", np.zeros(n, np.int32))
            out["segment_ids"][r, sl] = segment + 1 + pieces
            out["positions"][r, sl] = e.get("positions", np.arange(n))
            segment += int(pieces[-1]) + 1
            offset += n
    return out


def bucket_length(longest: int, bucket_lengths: Sequence[int]) -> int:
    """The smallest bucket length that holds `longest` tokens."""
    fitting = [b for b in sorted(bucket_lengths) if b >= longest]
    if not fitting:
        raise ValueError(f"an example of {longest} tokens fits no bucket of {sorted(bucket_lengths)}")
    return fitting[0]


def pad_batch(examples: Sequence[Example], bucket_lengths: Sequence[int],
              rows: int | None = None) -> dict[str, np.ndarray]:
    """One example per row, padded to the smallest bucket length that holds the longest one."""
    length = bucket_length(max(len(e["tokens"]) for e in examples), bucket_lengths)
    return fill_rows(examples, [[i] for i in range(len(examples))], rows or len(examples), length)


def non_pad_share(batch: dict[str, np.ndarray]) -> float:
    """Share of the batch's token slots that hold a real token (segment id != 0)."""
    return float(np.mean(batch["segment_ids"] != 0))
