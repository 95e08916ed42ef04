"""Reference log-probabilities for full-parameter DPO, IPO and constrained SFT, computed once.

A LoRA run's reference is its frozen base (training/step.py). A full-parameter run would need a
second copy of the weights during training; instead, before the first step, one forward pass of
the starting model over every training example gives each position's log p(target), stored in
`<workdir>/reference_logps.npz` with a fingerprint of the examples' tokens and read back on
resume (the params have moved on by then), then carried with the data as `ref_logps` (the batch
key the step reads). No second model is in memory while training.

    examples = reference.attach(examples, reference.load_or_compute(workdir, examples, compute))
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import tqdm
from etils import epath

from derta_jax import storage
from derta_jax.data import loader, packing
from derta_jax.data.tokenize import TokenizedExample, materialize
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder, lm_head_weight
from derta_jax.training import preference as pref
from derta_jax.training import sharding as shd

log = logging.getLogger(__name__)

FILE = "reference_logps.npz"
Logps = list[np.ndarray]  # per example: float32, one per position of materialize(example)


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A hash of the examples' token ids (both sequences of a pair) and prompt lengths."""
    h = hashlib.sha256()
    for ex in examples:
        for ids in (ex.tokens, ex.rejected if ex.rejected is not None else np.zeros(0, np.int32)):
            h.update(np.asarray(ids, np.int32).tobytes())
            h.update(b"|")
        h.update(str(ex.prompt_len).encode() + b";")
    return h.hexdigest()


class Attached(Sequence[TokenizedExample]):
    """`examples` with each one's reference log-probs, read one at a time (prepared examples
    stay on disk); their planning `table` passes through."""

    def __init__(self, examples: Sequence[TokenizedExample], logps: Logps):
        if len(examples) != len(logps):
            raise ValueError(f"{len(logps)} reference log-probs for {len(examples)} examples")
        self.examples, self.logps = examples, logps
        self.table = loader.table(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return dataclasses.replace(self.examples[i], ref_logps=self.logps[i])


def attach(examples: Sequence[TokenizedExample], logps: Logps) -> Attached:
    return Attached(examples, logps)


def load_or_compute(workdir: epath.Path, examples: Sequence[TokenizedExample],
                    compute: Callable[[], Logps], has_progress: bool) -> Logps:
    """The workdir's stored log-probs (checked against the examples), else `compute()` written
    there first. A run with progress but no stored file stops: its starting params are gone."""
    path = workdir / FILE
    want = fingerprint(examples)
    if path.exists():
        with path.open("rb") as stream, np.load(stream) as f:
            if str(f["fingerprint"]) != want or len(f["lengths"]) != len(examples):
                raise ValueError(f"{path} holds reference log-probs of other training examples "
                                 "(the data or tokenizer changed); move it away to recompute them "
                                 "from model.checkpoint")
            flat, lengths = f["logps"], f["lengths"]
        log.info("reference log-probs of %d examples read from %s", len(examples), path)
        return [flat[e - n:e] for e, n in zip(np.cumsum(lengths), lengths)]
    if has_progress:
        raise ValueError(f"{path} is missing but the run has checkpoints: the reference log-probs "
                         "come from the starting params, which a resumed run no longer has")
    logps = compute()
    if jax.process_index() == 0:
        stream = io.BytesIO()
        np.savez(stream, logps=np.concatenate(logps) if logps else np.zeros(0, np.float32),
                 lengths=np.array([len(x) for x in logps], np.int64), fingerprint=want)
        storage.write_whole(path, stream.getvalue())
        log.info("reference log-probs of %d examples written to %s", len(examples), path)
    return logps


def compute(examples: Sequence[TokenizedExample], params: Any, cfg: ModelConfig, mesh: Any,
            seq_len: int, rows: int, chunk_size: int) -> Logps:
    """Each example's log p(target) under `params`: the examples packed first-fit-decreasing into
    batches of `rows` rows of `seq_len`, one forward pass each (eval mode, no gradient)."""
    if any(ex.max_cut for ex in examples):
        raise ValueError("a stored reference needs examples without a token cut (data.cut=token "
                         "re-draws them every epoch); use data.cut=word or a LoRA run")
    arrays = [materialize(ex, seq_len) for ex in examples]
    bins = packing.first_fit_decreasing([len(a["tokens"]) for a in arrays], seq_len)

    @jax.jit
    def forward(params, batch):
        hidden, _ = Decoder(cfg).apply({"params": params}, batch["tokens"], batch["positions"],
                                       batch["segment_ids"], return_hidden=True)
        out = pref.token_logps(hidden, lm_head_weight(params, cfg), batch["targets"], chunk_size)
        return jax.lax.with_sharding_constraint(out, shd.replicated(mesh))

    out: Logps = [np.zeros(0, np.float32)] * len(examples)
    groups = [bins[i:i + rows] for i in range(0, len(bins), rows)]
    for group in tqdm.tqdm(groups, desc="reference log-probs", disable=jax.process_index() != 0):
        batch = packing.fill_rows(arrays, group, rows, seq_len)
        with mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
            keys = ("tokens", "positions", "segment_ids", "targets")
            sharded = shd.shard_batch(shd.local_rows({k: batch[k] for k in keys}), mesh)
            logp = np.asarray(jax.device_get(forward(params, sharded)))
        for r, members in enumerate(group):
            offset = 0
            for i in members:
                n = len(arrays[i]["tokens"])
                out[i] = logp[r, offset:offset + n].astype(np.float32)
                offset += n
    return out
