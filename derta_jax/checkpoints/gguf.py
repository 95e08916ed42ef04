"""GGUF (llama.cpp) files -> ModelConfig, the canonical parameter tree and the tokenizer.

Only the `llama` architecture is read (SmolLM2, LLaMA, and Mistral files, which llama.cpp also
stores as `llama`). Quantised tensors are dequantised with `gguf.quants.dequantize` one at a time
(numpy only); the reader memory-maps the file. llama.cpp permutes the rows of attn_q/attn_k for
its rotary layout; we undo it exactly as transformers' GGUF loader does, then go through the same
Hugging Face name map as safetensors (`names.hf_tensor_specs`). A file in a bucket (gs://...) is
downloaded to a temporary folder first (it is memory-mapped); messages name it as given.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers import PreTrainedTokenizerBase

from derta_jax import storage
from derta_jax.checkpoints.hf import check_tensors, counting
from derta_jax.checkpoints.model_dir import load_tokenizer
from derta_jax.checkpoints.names import (Params, TensorSpec, canonical_shapes, hf_tensor_specs,
                                         lazy_tree, read_tree, release_pages)
from derta_jax.models.config import ModelConfig

# Hugging Face name (regex) -> GGUF name, llama architecture.
_HF_TO_GGUF = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"blk.\1.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"blk.\1.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
)


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face llama tensor name."""
    for pattern, repl in _HF_TO_GGUF:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, repl, hf_name)
    raise ValueError(f"tensor {hf_name!r} has no GGUF llama name")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation ([out, in] weights, `n_heads` heads in `out`).

    llama.cpp stores each head's rows as (half, pair) interleaved; Hugging Face keeps the two
    rotary halves contiguous: rows (h, d, two) -> (h, two, d).
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _then(first: Callable[[np.ndarray], np.ndarray],
          fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: fn(first(x))


def gguf_tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every GGUF tensor name expected for `cfg`, with its (dequantised) shape and destinations."""
    if cfg.is_moe:
        raise ValueError("GGUF loading supports dense llama models only (num_experts=0)")
    specs = {}
    for hf_name, spec in hf_tensor_specs(cfg).items():
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(hf_name.split(".")[-2])
        if heads is not None:
            unpermute = lambda x, n=heads: unpermute_rope_rows(x, n)  # noqa: E731
            spec = dataclasses.replace(
                spec, outputs=tuple((p, _then(unpermute, fn)) for p, fn in spec.outputs))
        specs[gguf_name(hf_name)] = spec
    return specs


class _SizedReader(GGUFReader):
    """A GGUFReader that maps the tensors only when the file holds them all: `expected_size` is
    where the last tensor ends (data start + its offset + its bytes)."""

    expected_size: int

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        ends = [start_offs]
        for field in fields:  # parts: name length, name, n_dims, dims, type, offset
            _, _, _, dims, raw_type, offset = field.parts
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type[0])]
            ends.append(start_offs + int(offset[0]) + int(np.prod(dims)) * size // block)
        self.expected_size = max(ends)
        if self.expected_size <= len(self.data):
            super()._build_tensors(start_offs, fields)


def _open_reader(path: pathlib.Path, shown: str | os.PathLike | None = None) -> GGUFReader:
    """Reads a GGUF file's header and maps its tensors; a cut or damaged file is a ValueError
    naming it (`shown`, when it is a download of that; a truncated one with the expected and
    actual sizes)."""
    shown = path if shown is None else shown
    try:
        reader = _SizedReader(path)
    except (ValueError, IndexError, KeyError) as e:  # gguf's errors on a cut or damaged header
        raise ValueError(f"{shown} is not a readable GGUF file (damaged or truncated header, "
                         f"{path.stat().st_size} bytes): {type(e).__name__}: {e}") from e
    if reader.expected_size > len(reader.data):
        raise ValueError(f"{shown} is truncated: its tensors need {reader.expected_size} bytes, "
                         f"the file has {len(reader.data)}")
    return reader


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: GGUFReader, path: str | os.PathLike, **runtime) -> ModelConfig:
    """ModelConfig from the GGUF metadata (`llama.*` and `tokenizer.ggml.*` keys)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF general.architecture {arch!r} (supported: llama)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: has rope_freqs.weight (LLaMA-3.1 rope scaling), which GGUF "
                         "loading does not read; convert the safetensors checkpoint instead")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else None)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        **runtime,
    )


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType,
                block_bytes: int = 16 * 2**20) -> np.ndarray:
    """`gguf.quants.dequantize`, a block of rows at a time into one float32 array (its own
    temporaries are several times what it dequantises); float32 stays a view of the file."""
    if qtype == GGMLQuantizationType.F32 or data.ndim < 2:
        return dequantize(data, qtype)
    first = dequantize(data[:1], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), np.float32)
    step = max(1, block_bytes // first.nbytes)
    for start in range(0, data.shape[0], step):
        out[start:start + step] = dequantize(data[start:start + step], qtype)
    return out


def lazy_gguf(path: str | os.PathLike, dtype: str = "float32", progress: bool = True
              ) -> tuple[ModelConfig, Params, PreTrainedTokenizerBase]:
    """Reads a llama GGUF file's header: (ModelConfig with `param_dtype=dtype`, the canonical
    tree of `LazyTensor`s in `dtype`, the tokenizer).

    The file's size and the tensor names and shapes are checked, and the tokenizer read, before
    any tensor is dequantised; each leaf dequantises its tensor when it is read. A bucket URL is
    downloaded first (`storage.local_copy`).
    """
    given = storage.path(path)
    if not given.is_file():
        raise ValueError(f"GGUF file not found: {given}")
    path = storage.local_copy(given)
    reader = _open_reader(path, given)
    cfg = gguf_config(reader, given, param_dtype=dtype)
    specs = gguf_tensor_specs(cfg)
    # GGUF shapes are in ggml order (fastest axis first): reversed, they are numpy's [out, in].
    found = {t.name: (path.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    check_tensors(specs, found, cfg, str(given))
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        array = _dequantize(tensors[name].data, tensors[name].tensor_type)
        if not isinstance(array, np.memmap):  # dequantised into memory: drop the pages it read
            release_pages(reader.data)()
        return array  # still mapped (float32): lazy_tree copies it in slabs

    read = counting(read, specs, f"dequantising {path.name}", progress)
    return cfg, lazy_tree(specs, canonical_shapes(cfg), dtype, read), tokenizer


def load_gguf(path: str | os.PathLike, dtype: str = "float32", progress: bool = True
              ) -> tuple[ModelConfig, Params, PreTrainedTokenizerBase]:
    """`lazy_gguf`, read: the params are numpy arrays in `dtype`."""
    cfg, tree, tokenizer = lazy_gguf(path, dtype, progress)
    return cfg, read_tree(tree), tokenizer
