"""The grain loader: deterministic, per-host sharded, resumable batches of the batch contract.

    loader = make_loader(examples, batch_size_per_host=8, seq_len=512, seed=0)
    batch = next(loader)            # dict of numpy [8, 512] (see architecture.md, "Data")
    state = loader.get_state()      # save with the checkpoint (grain.PyGrainCheckpointSave(loader))
    loader.set_state(state)         # or grain.PyGrainCheckpointRestore(fresh_loader)

Order of operations: the example indices are shuffled per epoch (a new permutation every epoch,
from `seed`), host `shard_index` of `shard_count` takes every shard_count-th of them (so the hosts
together see each example exactly once per epoch), each example becomes its arrays (a token-cut
example draws k uniform in [0, max_cut] from (seed, epoch, example index): the same draw whatever
the number of hosts), then rows are packed (or padded to length buckets) and batched; incomplete
last batches are dropped. `num_epochs=None` repeats forever: train for a number of steps, so that
hosts whose shards pack into different numbers of rows never wait on each other.

Batches are per-host: `make_global_batch` turns them into global `jax.Array`s with
`jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

from typing import Any, Sequence

import grain
import jax
import numpy as np

from derta_jax.data import packing as packing_mod
from derta_jax.data.tokenize import TokenizedExample, materialize

_CUT_STREAM = 0x0C07  # separates the cut's random stream from others seeded by the run's seed


def draw_cut(example: TokenizedExample, seed: int, epoch: int, index: int) -> int:
    """k for a token-cut example in one epoch: uniform in [0, max_cut], 0 for other examples."""
    if not example.cut_len:
        return 0
    rng = np.random.default_rng([_CUT_STREAM, seed, epoch, index])
    return int(rng.integers(0, example.max_cut + 1))


def _check(examples: Sequence[TokenizedExample], batch_size: int, seq_len: int,
           shard_index: int, shard_count: int) -> None:
    if not examples:
        raise ValueError("no examples to load")
    if batch_size < 1:
        raise ValueError(f"batch_size_per_host={batch_size} must be >= 1")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} outside [0, shard_count={shard_count})")
    if len(examples) < shard_count:
        raise ValueError(f"{len(examples)} examples cannot be sharded over {shard_count} hosts")
    for i, ex in enumerate(examples):
        if ex.prompt_len + ex.max_cut >= seq_len:
            raise ValueError(f"example {i} has a {ex.prompt_len}-token prompt (+{ex.max_cut} cut) that "
                             f"leaves no supervised token in seq_len={seq_len}; build the examples "
                             f"with max_length <= seq_len")


def make_loader(examples: Sequence[TokenizedExample], batch_size_per_host: int, seq_len: int,
                seed: int, packing: bool = True, shard_index: int | None = None,
                shard_count: int | None = None, num_epochs: int | None = None,
                num_bins: int | None = None, bucket_lengths: Sequence[int] | None = None
                ) -> grain.DatasetIterator:
    """An iterator of per-host batch dicts with get_state()/set_state() (see module docstring).

    shard_index/shard_count default to jax.process_index()/process_count(). `num_bins`: rows
    packed at once (default batch_size_per_host). `bucket_lengths` (packing=False): the row
    lengths allowed, default (seq_len,).
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    _check(examples, batch_size_per_host, seq_len, shard_index, shard_count)
    indices = grain.MapDataset.range(len(examples)).shuffle(seed=seed)[shard_index::shard_count]
    per_epoch = len(indices)

    def to_arrays(i: int, index: int) -> dict[str, np.ndarray]:
        ex = examples[index]
        return materialize(ex, seq_len, draw_cut(ex, seed, i // per_epoch, index))

    rows = indices.repeat(num_epochs).map_with_index(to_arrays).to_iter_dataset()
    if packing:
        batches = packing_mod.pack(rows, seq_len, batch_size_per_host, num_bins, seed)
    else:
        batches = packing_mod.pad_to_buckets(rows, batch_size_per_host, bucket_lengths or (seq_len,))
    return iter(batches)


def make_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
                      ) -> dict[str, Any]:
    """Per-host numpy batch -> global jax.Arrays laid out by `sharding` (batch axis sharded)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
