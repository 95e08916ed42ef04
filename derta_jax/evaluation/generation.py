"""Batched KV-cache generation: left padding, prefill, one compiled decode loop, stop ids, top-p.

Prompt lengths are bucketed to powers of two (at least 16) and the cache to the power of two that
holds prompt + new tokens, so prompts of different lengths within a bucket reuse the same compiled
prefill and decode loop; the decode loop is a `lax.while_loop` over one decode step, compiled once
per (batch, cache length) and stopped as soon as every row has finished. Each step's attention
reads only the cache blocks written so far (models/attention.py). Rows that have finished no
longer cost decode steps: once at most half of a batch's rows are unfinished, the loop pauses and
those rows go on alone as a batch of half the size (down to COMPACT_MIN_ROWS rows, and while
the half still divides over the mesh's batch axes), each half size with its own compiled loop.

Generation runs over a device mesh (`training/sharding.py`): the batch rows (and the KV cache) are
split over the `data` and `fsdp` axes, and the parameters are placed by the logical-axis rules
(replicated on a data-only mesh, split over `fsdp`/`tensor` when those axes are larger than 1).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from derta_jax.models.cache import init_cache
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder
from derta_jax.training import sharding as shd

MIN_BUCKET = 16
COMPACT_MIN_ROWS = 4  # decoding continues on half the batch only while that half has this many rows


@dataclasses.dataclass
class Generation:
    token_ids: list[int]  # generated ids, the stop token excluded
    finish_reason: str  # "stop" | "length"


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def left_pad(rows: Sequence[Sequence[int]], length: int, batch: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, positions, segment ids [batch, length]: rows right-aligned, padding segment 0,
    positions counting from 0 at each row's first real token; rows past len(rows) are all padding."""
    tokens = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    segments = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        tokens[i, length - n:] = row
        positions[i, length - n:] = np.arange(n)
        segments[i, length - n:] = 1
    return tokens, positions, segments


def sample(logits_BV: jnp.ndarray, key: jax.Array, temperature: float, top_p: float) -> jnp.ndarray:
    """Greedy at temperature 0; otherwise nucleus sampling from softmax(logits / temperature)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top token is always kept
        threshold = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Settings:
    cfg: ModelConfig
    cache_len: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    temperature: float
    top_p: float
    pause_at: int = 0  # the decode loop also stops once at most this many rows are unfinished


def _record(state: dict, token_B: jnp.ndarray, stop_ids: jnp.ndarray) -> dict:
    """Appends each unfinished row's token at `step`, or marks the row stopped on a stop id."""
    is_stop = jnp.isin(token_B, stop_ids) & ~state["done"]
    write = ~state["done"] & ~is_stop
    out = state["out"].at[:, state["step"]].set(jnp.where(write, token_B, -1))
    return {**state, "out": out, "token": token_B, "length": state["length"] + write,
            "stopped": state["stopped"] | is_stop, "done": state["done"] | is_stop,
            "step": state["step"] + 1}


def _constrain_cache(cache: dict) -> dict:
    """Cache rows split like the batch, K/V heads like the attention (logical rules)."""
    def one(x: jnp.ndarray) -> jnp.ndarray:
        if x.ndim < 2:
            return x
        if x.ndim == 2:  # positions, segment ids [B, S]
            return nn.with_logical_constraint(x, ("batch", "length"))
        axes = ("batch", "kv_heads", "length", "head_dim")  # K/V [(layers,) B, K, S, Dh]
        return nn.with_logical_constraint(x, ("layers",) * (x.ndim - 4) + axes)
    return jax.tree.map(one, cache)


@functools.partial(jax.jit, static_argnames="s")
def _prefill(variables, tokens_BP, positions_BP, segments_BP, active_B, key, s: _Settings) -> dict:
    B = tokens_BP.shape[0]
    cache = _constrain_cache(init_cache(s.cfg, B, s.cache_len))
    logits, aux = Decoder(s.cfg).apply(variables, tokens_BP, positions_BP, segments_BP, cache=cache)
    key, sub = jax.random.split(key)
    state = {"cache": aux["cache"], "position": positions_BP[:, -1] + 1, "key": key,
             "step": jnp.zeros((), jnp.int32), "done": ~active_B,
             "stopped": jnp.zeros((B,), bool), "length": jnp.zeros((B,), jnp.int32),
             "out": jnp.full((B, s.max_new_tokens), -1, jnp.int32), "token": jnp.zeros((B,), jnp.int32)}
    token = sample(logits[:, -1], sub, s.temperature, s.top_p)
    return _record(state, token, jnp.asarray(s.stop_ids, jnp.int32))


@functools.partial(jax.jit, static_argnames="s", donate_argnames="state")
def _decode(variables, state: dict, s: _Settings) -> dict:
    stop_ids = jnp.asarray(s.stop_ids, jnp.int32)
    model = Decoder(s.cfg)

    def unfinished(st):
        return (st["step"] < s.max_new_tokens) & (jnp.sum(~st["done"]) > s.pause_at)

    def step(st):
        B = st["token"].shape[0]
        logits, aux = model.apply(variables, st["token"][:, None], st["position"][:, None],
                                  jnp.ones((B, 1), jnp.int32), cache=st["cache"])
        key, sub = jax.random.split(st["key"])
        token = sample(logits[:, -1], sub, s.temperature, s.top_p)
        st = {**st, "cache": aux["cache"], "position": st["position"] + 1, "key": key}
        return _record(st, token, stop_ids)

    return jax.lax.while_loop(unfinished, step, state)


@functools.partial(jax.jit, static_argnames="scan_layers")
def _keep_rows(state: dict, rows: jnp.ndarray, scan_layers: bool) -> dict:
    """The state of the given rows only (a smaller batch); every per-row array has the batch on
    axis 0, except stacked (scan_layers) K/V [layers, B, K, S, Dh], which have it on axis 1."""
    def take(x):
        if x.ndim == 0:
            return x
        return jnp.take(x, rows, axis=1 if scan_layers and x.ndim == 5 else 0)
    state = jax.tree.map(take, state)
    return {**state, "cache": _constrain_cache(state["cache"])}


def _pause_at(batch: int, split: int) -> int:
    """Unfinished rows at which decoding pauses to continue on half the batch: batch / 2 when that
    is at least COMPACT_MIN_ROWS and still divides over the mesh's batch axes; else 0 (no pause)."""
    half = batch // 2
    if batch % 2 or half < max(COMPACT_MIN_ROWS, split) or half % split:
        return 0
    return half


def _run_batch(variables, inputs, key, settings: _Settings, split: int) -> dict[int, Generation]:
    """Prefill and decode one batch; whenever at most half its rows are unfinished, the
    unfinished ones continue alone on half the batch (finished rows stop costing decode steps).
    Returns the Generation of every active row, by row."""
    batch = inputs[0].shape[0]
    generations: dict[int, Generation] = {}
    rows = np.arange(batch)  # the original row of each row of the current batch
    state = _prefill(variables, *inputs, key, settings)
    while True:
        s = dataclasses.replace(settings, pause_at=_pause_at(len(rows), split))
        state = _decode(variables, state, s)
        finished, step, out, length, stopped = jax.device_get(
            tuple(state[k] for k in ("done", "step", "out", "length", "stopped")))
        last = s.pause_at == 0 or step >= s.max_new_tokens or finished.all()
        leaving = np.flatnonzero(finished | last)
        for r in leaving:
            if rows[r] >= 0:
                generations[int(rows[r])] = Generation([int(t) for t in out[r, :length[r]]],
                                                "stop" if stopped[r] else "length")
        if last:
            return generations
        staying = np.flatnonzero(~finished)
        fill = s.pause_at - len(staying)  # copies of a finished row, done, make up the half batch
        keep = np.concatenate([staying, np.repeat(leaving[:1], fill)])
        state = _keep_rows(state, jnp.asarray(keep, jnp.int32), settings.cfg.scan_layers)
        state["done"] = state["done"] | (jnp.arange(s.pause_at) >= len(staying))
        rows = np.concatenate([rows[staying], np.full(fill, -1)])


def _check_args(cfg: ModelConfig, prompt_ids, max_new_tokens, temperature, top_p, lora) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
    empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty[:8]} are empty (every prompt needs at least one token)")
    if (cfg.lora_rank > 0) != (lora is not None):
        raise ValueError(f"lora_rank={cfg.lora_rank} but lora={'given' if lora is not None else None}: "
                         "pass the lora collection exactly when cfg.lora_rank > 0")


@functools.lru_cache(maxsize=8)
def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedShardings of the model's variables ({"params"[, "lora"]}) by the logical rules
    (cached: tracing the model's init takes seconds, and eval calls `generate` per batch group)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(
        lambda: Decoder(cfg).init({"params": jax.random.key(0)}, tokens, tokens, tokens + 1))
    return shd.logical_shardings(dict(boxed), mesh)


def default_mesh(params: Any) -> Mesh:
    """The mesh the params already live on (all NamedSharding on one mesh), else every device
    on the data axis."""
    meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(params)
              if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)}
    if len(meshes) == 1:
        return meshes.pop()
    return shd.make_mesh(shd.MeshConfig())


def _batch_split(mesh: Mesh) -> int:
    """How many ways the mesh splits the batch rows (its data x fsdp size)."""
    return int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))


def _batch_rows(num_prompts: int, batch_size: int, mesh: Mesh) -> int:
    """Rows per batch: at most batch_size (no more than the prompts need), rounded up to a
    multiple of the mesh's batch axes so every device gets the same number of rows."""
    split = _batch_split(mesh)
    rows = min(batch_size, bucket(num_prompts, minimum=1))
    return -(-rows // split) * split


def generate(params: Any, cfg: ModelConfig, prompt_ids: list[list[int]], *, max_new_tokens: int,
             stop_ids: Sequence[int], batch_size: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, lora: Any = None, progress: bool = True,
             mesh: Mesh | None = None) -> list[Generation]:
    """Generates for every prompt, in the order given. Prompts are grouped by length into batches
    of `batch_size` (the last one padded with inactive rows); greedy unless temperature > 0.

    mesh: where to run; None = `default_mesh(params)`. Batches are padded to a multiple of the
    mesh's data x fsdp size; parameters not yet on the mesh are placed by the logical rules.
    """
    _check_args(cfg, prompt_ids, max_new_tokens, temperature, top_p, lora)
    mesh = default_mesh(params) if mesh is None else mesh
    variables = {"params": params, **({"lora": lora} if lora is not None else {})}
    variables = jax.device_put(variables, param_shardings(cfg, mesh))
    rows_sharding = NamedSharding(mesh, P(shd.BATCH_AXES))
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batch = _batch_rows(len(order), batch_size, mesh)
    split = _batch_split(mesh)
    results: list[Generation | None] = [None] * len(order)
    key = jax.random.key(seed)
    bar = tqdm(total=len(order), desc="generating", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch):
        indices = order[start:start + batch]
        rows = [list(prompt_ids[i]) for i in indices]
        length = bucket(max(len(r) for r in rows))
        settings = _Settings(cfg, bucket(length + max_new_tokens), max_new_tokens,
                             tuple(int(t) for t in stop_ids), float(temperature), float(top_p))
        inputs = jax.device_put((*left_pad(rows, length, batch), np.arange(batch) < len(rows)),
                                (*[shd.batch_sharding(mesh)] * 3, rows_sharding))
        key, sub = jax.random.split(key)
        with mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
            by_row = _run_batch(variables, inputs, sub, settings, split)
        for row, i in enumerate(indices):
            results[i] = by_row[row]
        bar.update(len(indices))
    bar.close()
    return results
