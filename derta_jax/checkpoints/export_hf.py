"""A resolved checkpoint -> a Hugging Face folder (transformers, vLLM, TGI) or a PEFT adapter.

The tensor names, shapes and layouts come from the one name map (`names.py`), read backwards;
Mixtral experts get the Hub names `block_sparse_moe.experts.E.w1/w2/w3`.

Memory: each tensor is read from the checkpoint (one expert, one layer of a stacked tree),
converted and appended to its safetensors shard before the next one is read; shard headers are
written first from the planned shapes (`safetensors_io.py`), so a shard is never held in memory.
`out` may be a bucket URL (gs://...): the shards and JSON files are written to it directly, the
tokenizer files (which transformers writes locally) through `storage.staged`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from derta_jax import storage
from derta_jax.checkpoints import safetensors_io
from derta_jax.checkpoints.names import ParamPath, TensorSpec, hf_tensor_specs, to_hf_layout
from derta_jax.checkpoints.model_dir import load_tokenizer
from derta_jax.checkpoints.resolve import Checkpoint
from derta_jax.models import lora as lora_lib

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
    source: ParamPath  # canonical path
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
    by_path: dict[ParamPath, tuple[str, TensorSpec]] = {
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
    return to_hf_layout(w, t.source, t.shape)


def _prepare_out(out: epath.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out} is not empty; pass --overwrite to replace "
                             "its exported files")
        stale = [*out.glob("model*.safetensors"), out / safetensors_io.INDEX_FILE,
                 out / ADAPTER_FILE, out / ADAPTER_CONFIG]
        for f in stale:
            f.unlink(missing_ok=True)
    if not storage.is_url(out):  # a bucket has no folders to make
        out.mkdir(parents=True, exist_ok=True)


def eos_ids(ckpt: Checkpoint, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The model's eos ids, the tokenizer's eos and `<|eot_id|>` when the vocabulary has it."""
    vocab = tokenizer.get_vocab()
    ids = [*ckpt.cfg.eos_token_ids, tokenizer.eos_token_id, vocab.get(EOT_TOKEN)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _write_configs(ckpt: Checkpoint, out: epath.Path, dtype: str,
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


def export_hf(ckpt: Checkpoint, out: str | os.PathLike, dtype: str | None = None,
              lora: str | None = None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
              base_model: str | None = None, progress: bool = True) -> epath.Path:
    """Writes `ckpt` to `out` as a Hugging Face model (lora None or "merge") or adapter ("peft").

    dtype: float32 | bfloat16 for the written tensors (default: the config's param_dtype).
    lora: a checkpoint with LoRA adapters needs "merge" (W + alpha/r * A @ B folded into the
      weights) or "peft" (adapter_config.json + adapter_model.safetensors for the base model).
    base_model: written as the adapter's `base_model_name_or_path`.
    """
    dtype = dtype or ckpt.cfg.param_dtype
    if dtype not in safetensors_io.DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: "
                         f"{', '.join(safetensors_io.DTYPES)}")
    if lora not in (None, "merge", "peft"):
        raise ValueError(f"lora={lora!r}: expected None, 'merge' or 'peft'")
    if ckpt.has_lora and lora is None:
        raise ValueError(f"{ckpt.item_dir} has LoRA adapters (rank {ckpt.cfg.lora_rank}); pass "
                         "--merge-lora or --peft-adapter")
    if lora is not None and not ckpt.has_lora:
        raise ValueError(f"{ckpt.item_dir} has no LoRA adapters to {lora}")
    out = storage.path(out)
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
        safetensors_io.write_safetensors(out / ADAPTER_FILE, tensors, arrays(tensors), dtype)
        (out / ADAPTER_CONFIG).write_text(json.dumps(_adapter_config(ckpt, base_model), indent=2))
    else:
        shards = safetensors_io.plan_shards(tensors, jnp.dtype(dtype).itemsize, max_shard_bytes)
        weight_map = {}
        for i, group in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors_io.write_safetensors(out / name, group, arrays(group), dtype)
            weight_map.update({t.name: name for t in group})
        total = sum(math.prod(t.shape) for t in tensors) * jnp.dtype(dtype).itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / safetensors_io.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _write_configs(ckpt, out, dtype, tokenizer)
    bar.close()
    with storage.staged(out) as local:  # save_pretrained writes local files only
        tokenizer.save_pretrained(str(local))
    return out
