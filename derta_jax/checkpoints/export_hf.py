"""A resolved checkpoint -> a Hugging Face folder (transformers, vLLM, TGI) or a PEFT adapter.

The tensor names and shapes come from `hf.hf_tensor_specs` (the load map, read backwards; Mixtral
experts get the Hub names `block_sparse_moe.experts.E.w1/w2/w3`). Canonical kernels are
`[*in, *out]` and Hugging Face Linear weights `[out, in]`, so a kernel goes out as
`kernel.reshape(hf_shape[::-1]).T`; embeddings and norms keep their layout.

Memory: each tensor is read from the checkpoint (one expert, one layer of a stacked tree),
converted and appended to its safetensors shard before the next one is read. Shard headers are
written first from the planned shapes, so a shard never has to be held in memory either.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import struct
from collections.abc import Iterator
from typing import BinaryIO

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from derta_jax.checkpoints.hf import Path, TensorSpec, hf_tensor_specs
from derta_jax.checkpoints.model_dir import load_tokenizer
from derta_jax.checkpoints.resolve import Checkpoint
from derta_jax.models import lora as lora_lib

DTYPES = {"float32": "F32", "bfloat16": "BF16"}
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EOT_TOKEN = "<|eot_id|>"  # LLaMA-3-Instruct ends a turn with it
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20 (Hugging Face's `max_shard_size` spelling)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"max shard size {text!r}: expected a number and a unit, e.g. 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its Hugging Face name and shape, and how to make it."""

    name: str
    shape: tuple[int, ...]
    source: Path  # canonical path
    index: tuple[int, ...]  # expert index into the canonical tensor, or ()
    kind: str  # "param" | "lora_A" | "lora_B"


def _model_tensors(ckpt: Checkpoint) -> list[OutTensor]:
    out = []
    for name, spec in hf_tensor_specs(ckpt.cfg).items():
        ((path, _),) = spec.outputs
        index = () if spec.expert is None else (spec.expert,)
        out.append(OutTensor(name, spec.shape, path, index, "param"))
    return out


def _adapter_tensors(ckpt: Checkpoint) -> list[OutTensor]:
    """PEFT names: base_model.model.<module>.lora_A.weight [r, in] and lora_B.weight [out, r]."""
    by_path: dict[Path, tuple[str, TensorSpec]] = {
        spec.outputs[0][0]: (name, spec) for name, spec in hf_tensor_specs(ckpt.cfg).items()
        if spec.expert is None}
    out, r = [], ckpt.cfg.lora_rank
    for kernel in ckpt.lora_kernels():
        if kernel not in by_path:
            raise ValueError(f"LoRA on {'/'.join(kernel[:-1])} (Mixtral experts) cannot be written "
                             "as a PEFT adapter; use --merge-lora")
        name, spec = by_path[kernel]
        module = "base_model.model." + name.removesuffix(".weight")
        fan_out, fan_in = spec.shape
        out.append(OutTensor(module + ".lora_A.weight", (r, fan_in), kernel, (), "lora_A"))
        out.append(OutTensor(module + ".lora_B.weight", (fan_out, r), kernel, (), "lora_B"))
    return out


def _to_hf(x: np.ndarray, source: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Canonical layout -> Hugging Face layout (kernels [*in, *out] -> [out, in])."""
    if source[-1] == "kernel":
        return x.reshape(shape[::-1]).T
    return x.reshape(shape)


def _make(ckpt: Checkpoint, t: OutTensor, merge: bool) -> np.ndarray:
    """The array of `t` in Hugging Face layout and the stored dtype; a merged kernel is summed
    in float32 (`merge_lora`) and cast back to the stored dtype."""
    if t.kind != "param":
        a, b = ckpt.read_lora(t.source)
        return a.T if t.kind == "lora_A" else b.T
    w = ckpt.read_param(t.source, t.index)
    if merge and t.source[:-1] + ("lora_a",) in ckpt.lora:
        a, b = ckpt.read_lora(t.source, t.index)
        merged = lora_lib.merge_lora({"k": {"kernel": w}}, {"k": {"lora_a": a, "lora_b": b}}, ckpt.cfg)
        w = np.asarray(merged["k"]["kernel"])
    return _to_hf(w, t.source, t.shape)


def _plan_shards(tensors: list[OutTensor], itemsize: int, max_bytes: int) -> list[list[OutTensor]]:
    """Greedy, in order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _header(tensors: list[OutTensor], dtype: str) -> bytes:
    """The safetensors header: JSON with each tensor's dtype, shape and byte range, 8-aligned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset, itemsize = 0, jnp.dtype(dtype).itemsize
    for t in tensors:
        end = offset + math.prod(t.shape) * itemsize
        header[t.name] = {"dtype": DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_safetensors(path: pathlib.Path, tensors: list[OutTensor], arrays: Iterator[np.ndarray],
                       dtype: str) -> None:
    """Streams `arrays` (one per tensor, in order) into one safetensors file."""
    with open(path, "wb") as f:
        f.write(_header(tensors, dtype))
        for t, array in zip(tensors, arrays, strict=True):
            if array.shape != t.shape:
                raise ValueError(f"tensor {t.name} came out with shape {list(array.shape)}, "
                                 f"expected {list(t.shape)}")
            _write_rows(f, array, jnp.dtype(dtype))
            del array


def _write_rows(f: BinaryIO, array: np.ndarray, dtype: np.dtype,
                block_bytes: int = 16 * 2**20) -> None:
    """Writes `array` in C order as `dtype`, a block of rows at a time: a transposed view is
    made contiguous (and cast) block by block, never as a second whole copy."""
    rows = array.reshape(1, -1) if array.ndim < 2 else array
    step = max(1, block_bytes // max(1, rows[0].size * dtype.itemsize))
    for start in range(0, rows.shape[0], step):
        block = np.ascontiguousarray(rows[start:start + step], dtype=dtype)
        f.write(block.reshape(-1).view(np.uint8).data)


def _prepare_out(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out} is not empty; pass --overwrite to replace "
                             "its exported files")
        stale = [*out.glob("model*.safetensors"), out / INDEX_FILE, out / ADAPTER_FILE,
                 out / ADAPTER_CONFIG]
        for f in stale:
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def eos_ids(ckpt: Checkpoint, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The model's eos ids, the tokenizer's eos and `<|eot_id|>` when the vocabulary has it."""
    vocab = tokenizer.get_vocab()
    ids = [*ckpt.cfg.eos_token_ids, tokenizer.eos_token_id, vocab.get(EOT_TOKEN)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _write_configs(ckpt: Checkpoint, out: pathlib.Path, dtype: str,
                   tokenizer: PreTrainedTokenizerBase) -> None:
    config = {**ckpt.cfg.to_hf(), "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = eos_ids(ckpt, tokenizer)
    generation = {"bos_token_id": ckpt.cfg.bos_token_id,
                  "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _adapter_config(ckpt: Checkpoint, base_model: str | None) -> dict:
    cfg = ckpt.cfg
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted({p[-2] for p in ckpt.lora_kernels()}), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model}


def export_hf(ckpt: Checkpoint, out: str | pathlib.Path, dtype: str | None = None,
              lora: str | None = None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
              base_model: str | None = None, progress: bool = True) -> pathlib.Path:
    """Writes `ckpt` to `out` as a Hugging Face model (lora None or "merge") or adapter ("peft").

    dtype: float32 | bfloat16 for the written tensors (default: the config's param_dtype).
    lora: a checkpoint with LoRA adapters needs "merge" (W + alpha/r * A @ B folded into the
      weights) or "peft" (adapter_config.json + adapter_model.safetensors for the base model).
    base_model: written as the adapter's `base_model_name_or_path`.
    """
    dtype = dtype or ckpt.cfg.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if lora not in (None, "merge", "peft"):
        raise ValueError(f"lora={lora!r}: expected None, 'merge' or 'peft'")
    if ckpt.has_lora and lora is None:
        raise ValueError(f"{ckpt.item_dir} has LoRA adapters (rank {ckpt.cfg.lora_rank}); pass "
                         "--merge-lora or --peft-adapter")
    if lora is not None and not ckpt.has_lora:
        raise ValueError(f"{ckpt.item_dir} has no LoRA adapters to {lora}")
    out = pathlib.Path(out).absolute()
    tensors = _adapter_tensors(ckpt) if lora == "peft" else _model_tensors(ckpt)
    _prepare_out(out, overwrite)
    tokenizer = load_tokenizer(ckpt.tokenizer_dir)
    bar = tqdm(total=len(tensors), desc=f"exporting to {out.name}", unit="tensor",
               disable=not progress)

    def arrays(group: list[OutTensor]) -> Iterator[np.ndarray]:
        for t in group:
            yield _make(ckpt, t, merge=lora == "merge")
            bar.update()

    if lora == "peft":
        _write_safetensors(out / ADAPTER_FILE, tensors, arrays(tensors), dtype)
        (out / ADAPTER_CONFIG).write_text(json.dumps(_adapter_config(ckpt, base_model), indent=2))
    else:
        shards = _plan_shards(tensors, jnp.dtype(dtype).itemsize, max_shard_bytes)
        weight_map = {}
        for i, group in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / name, group, arrays(group), dtype)
            weight_map.update({t.name: name for t in group})
        total = sum(math.prod(t.shape) for t in tensors) * jnp.dtype(dtype).itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _write_configs(ckpt, out, dtype, tokenizer)
    bar.close()
    tokenizer.save_pretrained(str(out))
    return out
