"""Hugging Face safetensors -> the canonical parameter tree (docs/architecture.md).

Hugging Face Linear weights are `[out, in]`; ours are `[in, out]` kernels with the head axes split
out (q_proj `[H*Dh, D]` -> `[D, H, Dh]`, o_proj `[D, H*Dh]` -> `[H, Dh, D]`). Mixtral experts come
either with Hub names (`block_sparse_moe.experts.E.w1/w2/w3`, what `save_pretrained` writes) or
fused as in transformers 5 memory (`mlp.experts.gate_up_proj [E, 2F, D]`, `mlp.experts.down_proj
[E, D, F]`); both are stacked into `moe/{gate_proj,up_proj,down_proj}`.

Loading streams: every file is opened with `safe_open(framework="numpy")` and one tensor is read,
converted and stored at a time, so peak host memory is the converted tree plus one tensor.
Pickle weights (`*.bin`, `*.pt`) are refused; remote code is never run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from derta_jax.models.config import ModelConfig

Path = tuple[str, ...]
Params = dict
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Derivable buffers some older exports include; never parameters.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one Hugging Face tensor goes: its shape on disk and its canonical destinations.

    Each output is `(path, fn)`: `fn` turns the Hugging Face array into the canonical array (or,
    with `expert` set, into the slice at that index of the stacked expert axis).
    """

    shape: tuple[int, ...]
    outputs: tuple[tuple[Path, Callable[[np.ndarray], np.ndarray]], ...]
    expert: int | None = None


def canonical_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shape of every leaf of the canonical tree (`scan_layers=False`) for `cfg`."""
    D, H, K, Dh, F, V, E = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size, cfg.vocab_size, cfg.num_experts)
    shapes: dict[Path, tuple[int, ...]] = {("embed_tokens", "embedding"): (V, D)}
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


def safetensors_files(folder: str | os.PathLike) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint folder (sharded via the index, or all of them).

    Raises ValueError for pickle-only folders and for index entries whose file is missing.
    """
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index} lists shard files that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); they are refused because "
            "loading pickle can run arbitrary code. Use safetensors or GGUF only (for example "
            "re-save the model with save_pretrained(..., safe_serialization=True)).")
    raise ValueError(f"no *.safetensors files in {folder}")


def _read_shapes(files: list[pathlib.Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (file name, shape), from the headers only."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if name in found:
                    raise ValueError(f"tensor {name!r} appears in both {found[name][0]} and {path.name}")
                found[name] = (path.name, tuple(f.get_slice(name).get_shape()))
    return found


def check_tensors(specs: dict[str, TensorSpec], found: dict[str, tuple[str, tuple[int, ...]]],
                  cfg: ModelConfig, where: str, ignored: frozenset[str] = frozenset()) -> None:
    """Raises ValueError naming unexpected, missing or wrongly shaped tensors.

    `found` maps each tensor name in the checkpoint to (file it is in, shape); `ignored` names
    tensors that may be present but are not loaded.
    """
    unexpected = sorted(set(found) - set(specs) - ignored)
    if unexpected:
        raise ValueError(f"unexpected tensors in {where} for model_type={cfg.model_type!r}: "
                         f"{_short(unexpected)}")
    missing = sorted(set(specs) - set(found))
    if missing:
        raise ValueError(f"missing tensors in {where}: {_short(missing)}")
    for name, spec in specs.items():
        source, got = found[name]
        if got != spec.shape:
            raise ValueError(f"tensor {name!r} in {source} has shape {list(got)}, expected "
                             f"{list(spec.shape)} from the model config")


def _short(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class TreeBuilder:
    """Assembles the canonical tree from Hugging Face arrays, one tensor at a time.

    Stacked expert tensors are allocated once at their full shape and filled per expert.
    """

    def __init__(self, cfg: ModelConfig, dtype: str):
        self.params: Params = {}
        self._dtype = jnp.dtype(dtype)
        self._shapes = canonical_shapes(cfg)
        self._stacked: dict[Path, np.ndarray] = {}

    def add(self, spec: TensorSpec, array: np.ndarray) -> None:
        for path, fn in spec.outputs:
            value = np.ascontiguousarray(fn(array), dtype=self._dtype)
            if spec.expert is None:
                self._set(path, value)
                continue
            if path not in self._stacked:
                self._stacked[path] = np.empty(self._shapes[path], self._dtype)
                self._set(path, self._stacked[path])
            self._stacked[path][spec.expert] = value

    def _set(self, path: Path, value: np.ndarray) -> None:
        tree = self.params
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = value


def _iter_tensors(folder: pathlib.Path, found: dict, names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) one tensor at a time, file by file."""
    by_file: dict[str, list[str]] = {}
    for name, (file_name, _) in found.items():
        if name in names:
            by_file.setdefault(file_name, []).append(name)
    for file_name, file_names in by_file.items():
        path = folder / file_name
        with safe_open(path, framework="numpy") as f:
            for name in file_names:
                yield name, f.get_tensor(name)


def load_hf(folder: str | os.PathLike, dtype: str = "float32",
            progress: bool = True) -> tuple[ModelConfig, Params]:
    """Reads `config.json` and the safetensors of a Hugging Face checkpoint folder.

    Returns the ModelConfig (with `param_dtype=dtype`) and the canonical parameter tree as nested
    dicts of C-contiguous numpy arrays in `dtype` (float32 or bfloat16). Names, shapes and the file
    list are all checked from the headers before any tensor data is read.
    """
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} has no config.json (expected a Hugging Face checkpoint folder)")
    cfg = ModelConfig.from_hf(folder / "config.json", param_dtype=dtype)
    found = _read_shapes(safetensors_files(folder))
    fused = any(".mlp.experts.gate_up_proj" in n for n in found)
    specs = hf_tensor_specs(cfg, fused_experts=fused)
    ignored = {n for n in found if _IGNORED.match(n)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    check_tensors(specs, found, cfg, str(folder), frozenset(ignored))
    builder = TreeBuilder(cfg, dtype)
    bar = tqdm(total=len(specs), desc=f"loading {folder.name}", unit="tensor", disable=not progress)
    for name, array in _iter_tensors(folder, found, set(specs)):
        builder.add(specs[name], array)
        del array
        bar.update()
    bar.close()
    return cfg, builder.params
