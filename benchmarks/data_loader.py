"""Padding share on the demo data and the loader's examples/s (host CPU only).

    python -m benchmarks.data_loader [--tokenizer DIR] [--seq-len 512] [--batch 8] [--batches 200]

Builds the demo `derta` mixture (all helpful pairs, 320 RTO, 213 harmful-prefix examples) with the
LLaMA-3 fixture tokenizer, then, with `--batch` examples per step packed into rows of `--seq-len`
(first-fit decreasing) and padded one per row to length buckets, reports the rows per step the
loader plans, the share of non-pad tokens and how many examples per second it turns into batches
(tokenisation not included; reported apart).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import transformers

from benchmarks import common
from derta_jax.data import loader, packing, pipeline


def run(examples, seq_len: int, batch: int, batches: int, packed: bool) -> dict:
    plan = loader.make_plan(examples, batch, seq_len, seed=0, steps=batches + 1, packing=packed,
                            bucket_lengths=None if packed else (64, 128, 256, seq_len))
    it = loader.make_loader(examples, plan, seed=0)
    next(it)  # warm-up
    start, shares, slots = time.perf_counter(), [], 0
    for _ in range(batches):
        b = next(it)
        shares.append(packing.non_pad_share(b))
        slots += b["segment_ids"].size
    dt = time.perf_counter() - start
    return {"packed": packed, "rows_per_step": plan.rows_per_step,
            "non_pad_share": float(np.mean(shares)), "examples_per_s": batch * batches / dt,
            "tokens_per_s": slots / dt}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=str(common.LLAMA3_TOKENIZER))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="examples per step")
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.perf_counter()
    examples, stats = pipeline.training_examples(tok, "derta", max_length=args.seq_len,
                                                 rto_count=320, prefix_count=213)
    dt = time.perf_counter() - t0
    lengths = [len(e.tokens) for e in examples]
    print(f"tokenised {stats} in {dt:.2f} s ({len(examples) / dt:.0f} examples/s); "
          f"length mean {np.mean(lengths):.1f}, max {max(lengths)}")
    for packed in (True, False):
        print(run(examples, args.seq_len, args.batch, args.batches, packed))


if __name__ == "__main__":
    main()
