"""Peak host memory of `python -m derta_jax.convert` on a multi-shard safetensors checkpoint.

    python -m benchmarks.convert_memory [--hidden 1024 --layers 4 --vocab 16000 --shard-mb 50]

Builds a tiny-architecture but wide random LLaMA with transformers `save_pretrained(max_shard_size)`
(several shards, a few hundred MB), converts it in a child process and reports the child's peak
RSS (`ru_maxrss` from `os.wait4`, cross-checked with `getrusage(RUSAGE_CHILDREN)`) against the
checkpoint size, next to the peak RSS of a child that only imports the converter (the baseline).
The checkpoint is built in its own child too: Linux carries the parent's RSS high-water mark into
a forked child's ru_maxrss, so this parent stays small (no torch, no jax).
Streaming means: peak - baseline stays near one copy of the converted params, never two.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--build", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_checkpoint(args.build, args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        build_in_child(tmp / "hf", args)
        size = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors"))
        shards = len(list((tmp / "hf").glob("*.safetensors")))
        print(f"checkpoint: {shards} shards, {size / 2**20:.0f} MB float32")
        base, _ = child_peak_rss_mb([sys.executable, "-c", "import derta_jax.convert"])
        peak, secs = child_peak_rss_mb(
            [sys.executable, "-m", "derta_jax.convert", "--hf", str(tmp / "hf"), "--out",
             str(tmp / "out"), "--dtype", args.dtype, "--tokenizer", str(common.LLAMA3_TOKENIZER)])
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"baseline (imports only) peak RSS {base:.0f} MB; convert peak RSS {peak:.0f} MB "
          f"in {secs:.1f} s (RUSAGE_CHILDREN max over all children, builder included: "
          f"{children:.0f} MB)")
    print(f"convert peak - baseline = {peak - base:.0f} MB = {(peak - base) / (size / 2**20):.2f}x "
          f"the {size / 2**20:.0f} MB checkpoint (output dtype {args.dtype})")


if __name__ == "__main__":
    main()
