"""Batched KV-cache generation: left padding, prefill, one compiled decode loop, stop ids, top-p.

Prompt lengths are bucketed to powers of two (at least 16) and the cache to the power of two that
holds prompt + new tokens, so prompts of different lengths within a bucket reuse the same compiled
prefill and decode loop; the decode loop is a `lax.while_loop` over one decode step, compiled once
per (batch, cache length) and stopped as soon as every row has finished.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from derta_jax.models.cache import init_cache
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder

MIN_BUCKET = 16


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


def _record(state: dict, token_B: jnp.ndarray, stop_ids: jnp.ndarray) -> dict:
    """Appends each unfinished row's token at `step`, or marks the row stopped on a stop id."""
    is_stop = jnp.isin(token_B, stop_ids) & ~state["done"]
    write = ~state["done"] & ~is_stop
    out = state["out"].at[:, state["step"]].set(jnp.where(write, token_B, -1))
    return {**state, "out": out, "token": token_B, "length": state["length"] + write,
            "stopped": state["stopped"] | is_stop, "done": state["done"] | is_stop,
            "step": state["step"] + 1}


@functools.partial(jax.jit, static_argnames="s")
def _prefill(variables, tokens_BP, positions_BP, segments_BP, active_B, key, s: _Settings) -> dict:
    B = tokens_BP.shape[0]
    cache = init_cache(s.cfg, B, s.cache_len)
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
        return (st["step"] < s.max_new_tokens) & ~jnp.all(st["done"])

    def step(st):
        B = st["token"].shape[0]
        logits, aux = model.apply(variables, st["token"][:, None], st["position"][:, None],
                                  jnp.ones((B, 1), jnp.int32), cache=st["cache"])
        key, sub = jax.random.split(st["key"])
        token = sample(logits[:, -1], sub, s.temperature, s.top_p)
        st = {**st, "cache": aux["cache"], "position": st["position"] + 1, "key": key}
        return _record(st, token, stop_ids)

    return jax.lax.while_loop(unfinished, step, state)


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


def generate(params: Any, cfg: ModelConfig, prompt_ids: list[list[int]], *, max_new_tokens: int,
             stop_ids: Sequence[int], batch_size: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, lora: Any = None, progress: bool = True
             ) -> list[Generation]:
    """Generates for every prompt, in the order given. Prompts are grouped by length into batches
    of `batch_size` (the last one padded with inactive rows); greedy unless temperature > 0."""
    _check_args(cfg, prompt_ids, max_new_tokens, temperature, top_p, lora)
    variables = {"params": jax.device_put(params)}
    if lora is not None:
        variables["lora"] = jax.device_put(lora)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batch = min(batch_size, bucket(len(order), minimum=1))
    results: list[Generation | None] = [None] * len(order)
    key = jax.random.key(seed)
    bar = tqdm(total=len(order), desc="generating", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch):
        indices = order[start:start + batch]
        rows = [list(prompt_ids[i]) for i in indices]
        length = bucket(max(len(r) for r in rows))
        settings = _Settings(cfg, bucket(length + max_new_tokens), max_new_tokens,
                             tuple(int(t) for t in stop_ids), float(temperature), float(top_p))
        tokens, positions, segments = left_pad(rows, length, batch)
        active = np.arange(batch) < len(rows)
        key, sub = jax.random.split(key)
        state = _prefill(variables, tokens, positions, segments, active, sub, settings)
        state = jax.device_get(_decode(variables, state, settings))
        for row, i in enumerate(indices):
            n = int(state["length"][row])
            reason = "stop" if state["stopped"][row] else "length"
            results[i] = Generation([int(t) for t in state["out"][row, :n]], reason)
        bar.update(len(indices))
    bar.close()
    return results
