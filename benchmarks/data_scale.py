"""Start-up time and host memory of the training data path as the data grows (issue 14).

    python -m benchmarks.data_scale [--sizes 20000,200000] [--batch 128] [--seq-len 1024]

Writes a synthetic helpful source of N pairs (varied sentences, 40-140 words each) beside the
demo safety triples, then for each N runs, each in a fresh child process (LLaMA-3 tokenizer
loaded before the baseline):

    prepare   first start: data/prepared.py tokenises into a new data_dir
    reuse     a second start: opens the prepared folder
    in memory pipeline.training_examples, the path before (a list of every tokenised example)

and reports the seconds from the data config to the first batch (examples, plan, loader, one
batch) and the peak and final RSS above the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("the a model answer question river garden number letter window simple careful bright "
         "quiet early method result table record signal music paper travel winter summer "
         "kitchen recipe bridge mountain library history planet orbit engine circuit").split()


def write_source(path: pathlib.Path, n: int) -> None:
    import numpy as np
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(n):
            words = rng.choice(WORDS, size=int(rng.integers(40, 140)))
            f.write(json.dumps({"instruction": f"Question {i}: describe the {words[0]}.",
                                "output": " ".join(words) + "."}) + "\n")


def rss_mb(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def worker(args: argparse.Namespace) -> None:
    import transformers
    from derta_jax.data import loader, pipeline, prepared
    from derta_jax.training import config as config_lib

    tok = transformers.AutoTokenizer.from_pretrained(common.LLAMA3_TOKENIZER)
    d = config_lib.DataConfig(helpful=args.helpful, data_dir=args.data_dir,
                              max_length=args.seq_len)
    baseline = rss_mb("VmRSS")
    start = time.perf_counter()
    if args.worker == "in memory":
        examples, _ = pipeline.training_examples(tok, helpful=args.helpful,
                                                 max_length=args.seq_len)
    else:
        examples = prepared.examples(d, tok)
    plan = loader.make_plan(examples, args.batch, args.seq_len, seed=0)
    next(loader.make_loader(examples, plan, seed=0))
    seconds = time.perf_counter() - start
    print(json.dumps({"examples": len(examples), "seconds": seconds,
                      "peak_mb": rss_mb("VmHWM") - baseline, "rss_mb": rss_mb("VmRSS") - baseline}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,200000")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--helpful", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false")
    print("| examples | run | first batch after (s) | peak RSS above baseline (MB) | RSS then (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            helpful = pathlib.Path(tmp) / "helpful.jsonl"
            write_source(helpful, n)
            for run in ("prepare", "reuse", "in memory"):
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.data_scale", "--worker", run, "--helpful",
                     str(helpful), "--data-dir", str(pathlib.Path(tmp) / "data"), "--batch",
                     str(args.batch), "--seq-len", str(args.seq_len)],
                    cwd=ROOT, env=env, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {row['examples']:,} | {run} | {row['seconds']:.1f} | "
                      f"{row['peak_mb']:.0f} | {row['rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
