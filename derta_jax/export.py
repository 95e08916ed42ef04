"""Export a model dir or a training checkpoint to Hugging Face format (or a PEFT adapter).

    python -m derta_jax.export --checkpoint MODEL_DIR --out DIR
    python -m derta_jax.export --checkpoint WORKDIR [--step N] --out DIR [--dtype bfloat16]
        [--merge-lora | --peft-adapter [--base-model NAME]] [--max-shard-size 5GB] [--overwrite]

Writes config.json, generation_config.json, model-0000x-of-0000y.safetensors with
model.safetensors.index.json and the tokenizer files, loadable with
AutoModelForCausalLM/AutoTokenizer.from_pretrained; with --peft-adapter, adapter_config.json and
adapter_model.safetensors for `peft.PeftModel.from_pretrained(<the original HF model>, DIR)`.
Tensors are read and written one at a time. --checkpoint and --out may be bucket URLs (gs://...):
tensors are read from the bucket and the safetensors streamed into it directly. A user error (bad
flag value, missing path, params that disagree with the model config) is one line on stderr, exit
code 2.
"""
from __future__ import annotations

import argparse
import time

from etils import epath

from derta_jax import cli, storage
from derta_jax.checkpoints.export_hf import export_hf, parse_size
from derta_jax.checkpoints.resolve import resolve_checkpoint


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m derta_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=storage.path, required=True,
                        help="model dir, training workdir or <workdir>/checkpoints/<step> "
                        "(a folder or a gs:// URL)")
    parser.add_argument("--step", type=int, default=None,
                        help="training step (default: the workdir's latest)")
    parser.add_argument("--out", type=storage.path, required=True,
                        help="folder to write (or a gs:// URL)")
    parser.add_argument("--dtype", default=None,
                        help="float32 | bfloat16 (default: the stored param_dtype)")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="fold LoRA adapters into the weights (W + alpha/r * A @ B)")
    lora.add_argument("--peft-adapter", action="store_true",
                      help="write the LoRA adapters as a PEFT adapter instead of a model")
    parser.add_argument("--base-model", default=None,
                        help="the adapter's base_model_name_or_path (with --peft-adapter)")
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the exported files of a non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> epath.Path:
    args = _parse(argv)
    start = time.perf_counter()
    ckpt = resolve_checkpoint(args.checkpoint, args.step)
    lora = "merge" if args.merge_lora else "peft" if args.peft_adapter else None
    out = export_hf(ckpt, args.out, dtype=args.dtype, lora=lora,
                    max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
                    base_model=args.base_model)
    where = f"step {ckpt.step} of {ckpt.item_dir.parents[2]}" if ckpt.step is not None else str(
        args.checkpoint)
    print(f"exported {where} to {out} in {time.perf_counter() - start:.1f} s")
    return out


if __name__ == "__main__":
    cli.run_main(main)
