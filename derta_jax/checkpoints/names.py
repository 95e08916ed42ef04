"""The Hugging Face name map: every HF tensor <-> its place in our canonical parameter tree.

One map serves safetensors loading (`hf.py`), GGUF loading (`gguf.py`, which renames HF names to
llama.cpp's) and export (`export_hf.py`, the map read backwards). Per layer `i`:

    Hugging Face name (shape on disk)                      canonical path (docs/architecture.md)
    model.embed_tokens.weight         [V, D]               embed_tokens/embedding        [V, D]
    model.layers.i.input_layernorm.weight          [D]     layers_i/input_norm/scale     [D]
    model.layers.i.self_attn.q_proj.weight  [H*Dh, D]      layers_i/attn/q_proj/kernel   [D, H, Dh]
    model.layers.i.self_attn.k_proj.weight  [K*Dh, D]      layers_i/attn/k_proj/kernel   [D, K, Dh]
    model.layers.i.self_attn.v_proj.weight  [K*Dh, D]      layers_i/attn/v_proj/kernel   [D, K, Dh]
    model.layers.i.self_attn.o_proj.weight  [D, H*Dh]      layers_i/attn/o_proj/kernel   [H, Dh, D]
    model.layers.i.post_attention_layernorm.weight [D]     layers_i/post_attn_norm/scale [D]
    model.layers.i.mlp.{gate,up}_proj.weight  [F, D]       layers_i/mlp/{gate,up}_proj/kernel [D, F]
    model.layers.i.mlp.down_proj.weight       [D, F]       layers_i/mlp/down_proj/kernel [F, D]
    model.layers.i.block_sparse_moe.gate.weight [E, D]     layers_i/moe/router/kernel    [D, E]
    model.layers.i.block_sparse_moe.experts.e.w1/w3 [F, D] layers_i/moe/{gate,up}_proj/kernel[e]
    model.layers.i.block_sparse_moe.experts.e.w2    [D, F] layers_i/moe/down_proj/kernel[e]
    model.norm.weight                 [D]                  final_norm/scale              [D]
    lm_head.weight                    [V, D]               lm_head/kernel [D, V] (absent when tied)

HF -> ours: a Linear weight `[out, in]` is transposed to an `[in, out]` kernel with the head axes
split out; embeddings and norms keep their layout. Mixtral experts also come fused, as in
transformers 5 memory (`mlp.gate.weight`, `mlp.experts.gate_up_proj [E, 2F, D]`,
`mlp.experts.down_proj [E, D, F]`): `hf_tensor_specs(cfg, fused_experts=True)`.
Ours -> HF (`to_hf_layout`): a kernel `[*in, *out]` goes out as `kernel.reshape(hf_shape[::-1]).T`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import mmap
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from derta_jax.models.config import ModelConfig

ParamPath = tuple[str, ...]  # ("layers_0", "attn", "q_proj", "kernel")
Params = dict  # the canonical tree: nested dicts of arrays


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one Hugging Face tensor goes: its shape on disk and its canonical destinations.

    Each output is `(path, fn)`: `fn` turns the Hugging Face array into the canonical array (or,
    with `expert` set, into the slice at that index of the stacked expert axis).
    """

    shape: tuple[int, ...]
    outputs: tuple[tuple[ParamPath, Callable[[np.ndarray], np.ndarray]], ...]
    expert: int | None = None


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """One canonical tensor whose data is read from its checkpoint only when `read()` is called:
    how `python -m derta_jax.convert` writes a model dir one tensor at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def lazy_tree(specs: dict[str, TensorSpec], shapes: dict[ParamPath, tuple[int, ...]], dtype: str,
              read_source: Callable[[str], np.ndarray]) -> Params:
    """The canonical tree of LazyTensors in `dtype` for the source tensors `specs`.

    `read_source(name)` returns one source tensor's array; reading a leaf reads its source tensor
    (every expert of a stacked expert tensor) and lays it out. A leaf costs itself and its source
    at once, or itself and a slab when the source is mapped from its file (`copy_in_slabs`).
    """
    sources: dict[ParamPath, list[tuple[str, Callable[[np.ndarray], np.ndarray], int | None]]] = {}
    for name, spec in specs.items():
        for path, fn in spec.outputs:
            sources.setdefault(path, []).append((name, fn, spec.expert))
    out_dtype = np.dtype(jnp.dtype(dtype))
    tree: Params = {}
    for path, parts in sources.items():
        read = functools.partial(_assemble, shapes[path], out_dtype, tuple(parts), read_source)
        set_leaf(tree, path, LazyTensor(shapes[path], out_dtype, read))
    return tree


def _assemble(shape: tuple[int, ...], dtype: np.dtype, parts, read_source) -> np.ndarray:
    if parts[0][2] is None:  # one source tensor
        name, fn, _ = parts[0]
        source = read_source(name)
        if not isinstance(source, np.memmap):  # in memory already: one copy at most
            return np.ascontiguousarray(fn(source), dtype=dtype)
        out = np.empty(shape, dtype)
        copy_in_slabs(out, fn(source), release_pages(source))
        return out
    out = np.empty(shape, dtype)
    for name, fn, expert in parts:  # the experts of a stacked tensor
        source = read_source(name)
        copy_in_slabs(out[expert], fn(source), release_pages(source))
        del source
    return out


def release_pages(source: np.ndarray) -> Callable[[], None]:
    """For an array mapped from a file (`np.memmap`, read-only): a function that drops the pages
    read so far from the process's memory; for any other array, one that does nothing."""
    mapping = getattr(source, "_mmap", None)
    if mapping is None:
        return lambda: None
    return lambda: mapping.madvise(mmap.MADV_DONTNEED)


def copy_in_slabs(out: np.ndarray, view: np.ndarray, release: Callable[[], None],
                  slab_bytes: int = 16 * 2**20) -> None:
    """`out[...] = view` (casting), a slab at a time along the axis of `view` whose elements lie
    farthest apart in its source, so each slab reads one band of the source; `release()` after
    each slab. With a file-mapped source the copy holds `out` and one slab, never the source."""
    if view.ndim == 0 or view.size == 0:
        out[...] = view
        return
    axis = int(np.argmax(np.abs(view.strides)))
    step = max(1, view.shape[axis] * slab_bytes // max(1, view.nbytes))
    for start in range(0, view.shape[axis], step):
        slab = (slice(None),) * axis + (slice(start, start + step),)
        out[slab] = view[slab]
        release()


def read_tree(tree: Params) -> Params:
    """The tree with every LazyTensor read into a numpy array."""
    return jax.tree.map(lambda t: t.read(), tree)


def canonical_shapes(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shape of every leaf of the canonical tree (`scan_layers=False`) for `cfg`."""
    D, H, K, Dh, F, V, E = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size, cfg.vocab_size, cfg.num_experts)
    shapes: dict[ParamPath, tuple[int, ...]] = {("embed_tokens", "embedding"): (V, D)}
    for i in range(cfg.num_layers):
        l = f"layers_{i}"
        shapes.update({
            (l, "input_norm", "scale"): (D,),
            (l, "attn", "q_proj", "kernel"): (D, H, Dh),
            (l, "attn", "k_proj", "kernel"): (D, K, Dh),
            (l, "attn", "v_proj", "kernel"): (D, K, Dh),
            (l, "attn", "o_proj", "kernel"): (H, Dh, D),
            (l, "post_attn_norm", "scale"): (D,),
        })
        if cfg.is_moe:
            shapes.update({
                (l, "moe", "router", "kernel"): (D, E),
                (l, "moe", "gate_proj", "kernel"): (E, D, F),
                (l, "moe", "up_proj", "kernel"): (E, D, F),
                (l, "moe", "down_proj", "kernel"): (E, F, D),
            })
        else:
            shapes.update({
                (l, "mlp", "gate_proj", "kernel"): (D, F),
                (l, "mlp", "up_proj", "kernel"): (D, F),
                (l, "mlp", "down_proj", "kernel"): (F, D),
            })
    shapes[("final_norm", "scale")] = (D,)
    if not cfg.tie_word_embeddings:
        shapes[("lm_head", "kernel")] = (D, V)
    return shapes


def check_params(found: dict[ParamPath, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
    """Refuses stored tensors (canonical path -> shape) that are not `cfg`'s canonical tree,
    naming the first differing path: missing or of another shape (in tree order), then extra."""
    expected = canonical_shapes(cfg)
    for path, shape in expected.items():
        if path not in found:
            raise ValueError(f"{where} has no tensor for {'/'.join(path)} (model_type="
                             f"{cfg.model_type!r}, num_layers={cfg.num_layers}); is it a "
                             "checkpoint of this model config?")
        if found[path] != shape:
            raise ValueError(f"tensor {'/'.join(path)} in {where} has shape {list(found[path])}, "
                             f"expected {list(shape)} from the model config")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{where} has tensor {'/'.join(extra[0])} {list(found[extra[0]])}, which "
                         f"the model config does not have (num_layers={cfg.num_layers}, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings})")


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _t_split_out(*dims: int) -> Callable[[np.ndarray], np.ndarray]:
    """[out, in] -> [in, *dims] (q/k/v: out = heads * head_dim)."""
    return lambda x: x.T.reshape(x.shape[1], *dims)


def _t_split_in(*dims: int) -> Callable[[np.ndarray], np.ndarray]:
    """[out, in] -> [*dims, out] (o_proj: in = heads * head_dim)."""
    return lambda x: x.T.reshape(*dims, x.shape[0])


def _experts_t(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 1)


def _half(which: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fused gate_up_proj [E, 2F, D] -> gate (which=0) or up (which=1) as [E, D, F]."""
    def fn(x: np.ndarray) -> np.ndarray:
        f = x.shape[1] // 2
        return x[:, which * f:(which + 1) * f, :].transpose(0, 2, 1)
    return fn


def _layer_specs(cfg: ModelConfig, i: int, fused_experts: bool) -> dict[str, TensorSpec]:
    D, H, K, Dh, F, E = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.num_experts)
    p, l = f"model.layers.{i}.", f"layers_{i}"
    specs = {
        p + "input_layernorm.weight": TensorSpec((D,), (((l, "input_norm", "scale"), _same),)),
        p + "post_attention_layernorm.weight": TensorSpec(
            (D,), (((l, "post_attn_norm", "scale"), _same),)),
        p + "self_attn.q_proj.weight": TensorSpec(
            (H * Dh, D), (((l, "attn", "q_proj", "kernel"), _t_split_out(H, Dh)),)),
        p + "self_attn.k_proj.weight": TensorSpec(
            (K * Dh, D), (((l, "attn", "k_proj", "kernel"), _t_split_out(K, Dh)),)),
        p + "self_attn.v_proj.weight": TensorSpec(
            (K * Dh, D), (((l, "attn", "v_proj", "kernel"), _t_split_out(K, Dh)),)),
        p + "self_attn.o_proj.weight": TensorSpec(
            (D, H * Dh), (((l, "attn", "o_proj", "kernel"), _t_split_in(H, Dh)),)),
    }
    if not cfg.is_moe:
        for name, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
            specs[p + f"mlp.{name}.weight"] = TensorSpec(shape, (((l, "mlp", name, "kernel"), _t),))
        return specs
    moe = (l, "moe")
    if fused_experts:
        specs[p + "mlp.gate.weight"] = TensorSpec((E, D), ((moe + ("router", "kernel"), _t),))
        specs[p + "mlp.experts.gate_up_proj"] = TensorSpec((E, 2 * F, D), (
            (moe + ("gate_proj", "kernel"), _half(0)), (moe + ("up_proj", "kernel"), _half(1))))
        specs[p + "mlp.experts.down_proj"] = TensorSpec(
            (E, D, F), ((moe + ("down_proj", "kernel"), _experts_t),))
        return specs
    specs[p + "block_sparse_moe.gate.weight"] = TensorSpec((E, D), ((moe + ("router", "kernel"), _t),))
    for e in range(E):
        q = p + f"block_sparse_moe.experts.{e}."
        specs[q + "w1.weight"] = TensorSpec((F, D), ((moe + ("gate_proj", "kernel"), _t),), e)
        specs[q + "w3.weight"] = TensorSpec((F, D), ((moe + ("up_proj", "kernel"), _t),), e)
        specs[q + "w2.weight"] = TensorSpec((D, F), ((moe + ("down_proj", "kernel"), _t),), e)
    return specs


def hf_tensor_specs(cfg: ModelConfig, fused_experts: bool = False) -> dict[str, TensorSpec]:
    """Every Hugging Face tensor name expected for `cfg`, with its shape and destinations."""
    D, V = cfg.hidden_size, cfg.vocab_size
    specs = {"model.embed_tokens.weight": TensorSpec((V, D), ((("embed_tokens", "embedding"), _same),))}
    for i in range(cfg.num_layers):
        specs.update(_layer_specs(cfg, i, fused_experts))
    specs["model.norm.weight"] = TensorSpec((D,), ((("final_norm", "scale"), _same),))
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec((V, D), ((("lm_head", "kernel"), _t),))
    return specs


def to_hf_layout(x: np.ndarray, path: ParamPath, hf_shape: tuple[int, ...]) -> np.ndarray:
    """Canonical layout -> Hugging Face layout (kernels [*in, *out] -> [out, in])."""
    if path[-1] == "kernel":
        return x.reshape(hf_shape[::-1]).T
    return x.reshape(hf_shape)


def set_leaf(tree: Params, path: ParamPath, value: Any) -> None:
    """`tree[path[0]]...[path[-1]] = value`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
