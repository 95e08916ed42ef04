"""Convert a Hugging Face safetensors folder or a GGUF file into a derta_jax model dir.

    python -m derta_jax.convert --hf DIR --out MODEL_DIR [--dtype bfloat16]
    python -m derta_jax.convert --gguf FILE --out MODEL_DIR

Every path may be a bucket URL (gs://...). The model dir is written to the bucket directly (the
tokenizer files through a local folder); a gs:// source (--hf, --gguf) is downloaded to a
temporary folder first (its safetensors files, or the GGUF file: they are memory-mapped), so it
needs local disk the size of the checkpoint.

The tokenizer is taken from the checkpoint (the HF folder's tokenizer files, or the GGUF
metadata); `--tokenizer DIR` gives it from another folder. Tensors are read, laid out and written
one at a time, so the converter never holds more than about two of them; pickle weights are
refused. No code from the checkpoint's folder is ever run.
A user error (bad input file, missing path) is one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import time

import jax
from etils import epath
from transformers import PreTrainedTokenizerBase

from derta_jax import cli, storage
from derta_jax.checkpoints.gguf import lazy_gguf
from derta_jax.checkpoints.hf import lazy_hf
from derta_jax.checkpoints.model_dir import TOKENIZER_FILES, load_tokenizer, save_model_dir


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m derta_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=storage.path,
                        help="folder with config.json and *.safetensors (a gs:// URL is "
                        "downloaded to a temporary folder first)")
    source.add_argument("--gguf", type=storage.path,
                        help="a llama GGUF file (a gs:// URL is downloaded to a temporary "
                        "folder first)")
    parser.add_argument("--out", type=storage.path, required=True,
                        help="model dir to write (a folder or a gs:// URL)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the stored parameters")
    parser.add_argument("--tokenizer", type=storage.path, default=None,
                        help="folder with the tokenizer files, if not the checkpoint's own")
    return parser.parse_args(argv)


def _hf_tokenizer(folder: epath.Path) -> PreTrainedTokenizerBase:
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer files ({' / '.join(TOKENIZER_FILES)}); "
                         "pass --tokenizer DIR")
    return load_tokenizer(folder)


def main(argv: list[str] | None = None) -> epath.Path:
    args = _parse(argv)
    start = time.perf_counter()
    if args.hf is not None:
        if not args.hf.is_dir():
            raise ValueError(f"Hugging Face folder not found: {args.hf}")
        tokenizer = _hf_tokenizer(args.tokenizer or args.hf)
        cfg, params = lazy_hf(args.hf, dtype=args.dtype)
    else:
        cfg, params, tokenizer = lazy_gguf(args.gguf, dtype=args.dtype)
        if args.tokenizer is not None:
            tokenizer = _hf_tokenizer(args.tokenizer)
    out = save_model_dir(args.out, cfg, params, tokenizer)
    leaves = jax.tree.leaves(params)
    count = sum(x.size for x in leaves)
    print(f"converted {len(leaves)} tensors, {count:,} params ({args.dtype}) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return out


if __name__ == "__main__":
    cli.run_main(main)
