"""The loader: a fixed number of examples per optimizer step, packed into a fixed number of rows.

    plan = make_plan(examples, batch_size=128, seq_len=1024, seed=0, epochs=2)
    loader = make_loader(examples, plan)   # an iterator of global batch dicts, numpy [rows, seq_len]
    state = loader.get_state()             # saved with the checkpoint (grain.checkpoint.CheckpointSave)

`batch_size` is examples per optimizer step, as in the official recipe (derta-method.md,
"Batching"): each epoch is a new permutation of the examples (from `seed`), cut into steps of
`batch_size` examples (the last step of an epoch takes the rest, as the Hugging Face Trainer), so
an epoch is ceil(examples / batch_size) steps and every example is seen exactly once per epoch.
The examples of a step are packed first-fit-decreasing into `rows_per_step` rows of `seq_len`
(packing=True) or take one row each, padded to the smallest of `bucket_lengths` that holds the
longest (packing=False). `rows_per_step` is the most rows any step of the run needs, rounded up to
`row_multiple` (the data-parallel shards and micro-batches), so shapes are static and no example
is dropped or duplicated. A token-cut example draws k uniform in [0, max_cut] from
(seed, epoch, example index).

Every process builds the same global batch and keeps its rows (training/loop.py). `examples` is
a list or prepared examples (data/prepared.py): planning reads only their `table`, and a step
reads its own examples by random access.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Sequence

import grain
import numpy as np

from derta_jax.data import packing as pack_lib
from derta_jax.data.tokenize import TokenizedExample, materialize

_CUT_STREAM = 0x0C07  # separates the cut's random stream from others seeded by the run's seed
_ORDER_STREAM = 0x0D3D  # the per-epoch permutation's stream


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run's data looks like, step by step (logged and written to the workdir)."""

    examples: int  # examples in the data
    batch_size: int  # examples per optimizer step (the last step of an epoch takes the rest)
    steps_per_epoch: int  # ceil(examples / batch_size)
    total_steps: int  # steps of the run
    rows_per_step: int  # rows of seq_len that every step's examples are packed into
    seq_len: int  # tokens per row
    packing: bool  # several examples per row (False: one example per padded row)
    pad_share: float  # share of the run's token slots that are padding
    bucket_lengths: tuple[int, ...] = ()  # row lengths allowed without packing

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def draw_cut(example: TokenizedExample, seed: int, epoch: int, index: int) -> int:
    """k for a token-cut example in one epoch: uniform in [0, max_cut], 0 for other examples."""
    return _draw(example.cut_len, example.max_cut, seed, epoch, index)


def _draw(cut_len: int, max_cut: int, seed: int, epoch: int, index: int) -> int:
    if not cut_len:
        return 0
    rng = np.random.default_rng([_CUT_STREAM, seed, epoch, index])
    return int(rng.integers(0, max_cut + 1))


TABLE = ("prompt_len", "cut_len", "max_cut", "length0", "full")


def table(examples: Sequence[TokenizedExample]) -> dict[str, np.ndarray]:
    """What planning reads of every example, as integer arrays: prompt_len, cut_len, max_cut,
    `length0` (its length with k = 0) and `full` (with k > 0 harmful tokens kept it is full + k).
    Prepared examples keep this in memory (data/prepared.py), so a plan never reads them; a list
    is scanned once."""
    stored = getattr(examples, "table", None)
    return stored if stored is not None else table_of(examples)


def table_of(examples: Sequence[TokenizedExample]) -> dict[str, np.ndarray]:
    rows = np.array([(ex.prompt_len, ex.cut_len, ex.max_cut, ex.length(0),
                      len(ex.tokens) - ex.cut_len if ex.cut_len else ex.length(0))
                     for ex in examples], np.int64).reshape(-1, len(TABLE))
    return dict(zip(TABLE, rows.T))


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example indices in the order epoch `epoch` visits them."""
    return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_examples)


def step_examples(num_examples: int, batch_size: int, seed: int, step: int) -> tuple[np.ndarray, int]:
    """(example indices, epoch) of global step `step` (0-based)."""
    epoch, j = divmod(step, math.ceil(num_examples / batch_size))
    return epoch_order(num_examples, seed, epoch)[j * batch_size:(j + 1) * batch_size], epoch


def _check(examples: dict[str, np.ndarray], batch_size: int, seq_len: int) -> None:
    if not len(examples["prompt_len"]):
        raise ValueError("no examples to load")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    too_long = np.flatnonzero(examples["prompt_len"] + examples["max_cut"] >= seq_len)
    if len(too_long):
        i = too_long[0]
        raise ValueError(f"example {i} has a {examples['prompt_len'][i]}-token prompt "
                         f"(+{examples['max_cut'][i]} cut) that leaves no supervised token in "
                         f"seq_len={seq_len}; build the examples with max_length <= seq_len")


def make_plan(examples: Sequence[TokenizedExample], batch_size: int, seq_len: int, seed: int, *,
              epochs: float = 1.0, steps: int | None = None, packing: bool = True,
              row_multiple: int = 1, bucket_lengths: Sequence[int] | None = None) -> Plan:
    """The run's plan: `steps` steps, or ceil(epochs * steps_per_epoch) (the Trainer's count)."""
    t = table(examples)
    _check(t, batch_size, seq_len)
    n = len(t["prompt_len"])
    per_epoch = math.ceil(n / batch_size)
    total = steps if steps else max(1, math.ceil(epochs * per_epoch))
    buckets = tuple(sorted(bucket_lengths or (seq_len,)))
    rows, slots, tokens = 1, 0, 0
    for step in range(total):
        idx, epoch = step_examples(n, batch_size, seed, step)
        k = np.zeros(len(idx), np.int64)
        for j in np.flatnonzero(t["cut_len"][idx]):  # token-cut examples draw their k
            i = int(idx[j])
            k[j] = _draw(int(t["cut_len"][i]), int(t["max_cut"][i]), seed, epoch, i)
        lengths = np.minimum(np.where(k > 0, t["full"][idx] + k, t["length0"][idx]),
                             seq_len).tolist()
        tokens += sum(lengths)
        if packing:
            rows = max(rows, len(pack_lib.first_fit_decreasing(lengths, seq_len)))
            slots += seq_len
        else:
            rows = max(rows, len(lengths))
            slots += pack_lib.bucket_length(max(lengths), buckets)
    rows = math.ceil(rows / row_multiple) * row_multiple
    return Plan(examples=n, batch_size=batch_size, steps_per_epoch=per_epoch, total_steps=total,
                rows_per_step=rows, seq_len=seq_len, packing=packing,
                pad_share=1.0 - tokens / (slots * rows), bucket_lengths=() if packing else buckets)


def step_batch(examples: Sequence[TokenizedExample], plan: Plan, seed: int,
               step: int) -> dict[str, np.ndarray]:
    """The global batch of step `step` (0-based) under `plan`."""
    idx, epoch = step_examples(plan.examples, plan.batch_size, seed, step)
    read = ((int(i), examples[i]) for i in idx)  # one read each: a prepared example is decoded
    arrays = [materialize(ex, plan.seq_len, draw_cut(ex, seed, epoch, i)) for i, ex in read]
    if not plan.packing:
        return pack_lib.pad_batch(arrays, plan.bucket_lengths, rows=plan.rows_per_step)
    bins = pack_lib.first_fit_decreasing([len(a["tokens"]) for a in arrays], plan.seq_len)
    return pack_lib.fill_rows(arrays, bins, plan.rows_per_step, plan.seq_len)


def make_loader(examples: Sequence[TokenizedExample], plan: Plan, seed: int
                ) -> grain.DatasetIterator:
    """An iterator over the plan's batches with get_state()/set_state() (grain checkpointing)."""
    if len(examples) != plan.examples:
        raise ValueError(f"the plan is for {plan.examples} examples, got {len(examples)}")
    steps = grain.MapDataset.range(plan.total_steps).map(
        lambda step: step_batch(examples, plan, seed, int(step)))
    # One background thread builds the next batches while a step runs; memory stays bounded.
    return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
