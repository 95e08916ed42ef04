"""Packing efficiency on the demo data and the loader's examples/s (host CPU only).

    python -m benchmarks.data_loader [--tokenizer DIR] [--seq-len 512] [--batch 8] [--batches 200]

Builds the demo `derta` mixture (all 280 helpful, 320 RTO, 213 harmful-prefix examples) with the
LLaMA-3 fixture tokenizer, then for packing on/off reports the share of non-pad tokens and how many
examples per second the loader turns into batches (tokenisation not included; reported apart).
"""
from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
import transformers

from derta_jax.data import loader, packing, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(examples, seq_len: int, batch: int, batches: int, packed: bool, bins: int | None = None) -> dict:
    it = loader.make_loader(examples, batch, seq_len, seed=0, packing=packed, num_bins=bins,
                            bucket_lengths=(64, 128, 256, seq_len))
    next(it)  # warm-up
    start, shares, n_examples, slots = time.perf_counter(), [], 0, 0
    for _ in range(batches):
        b = next(it)
        shares.append(packing.non_pad_share(b))
        n_examples += int(sum(len(np.unique(s[s > 0])) for s in b["segment_ids"]))
        slots += b["segment_ids"].size
    dt = time.perf_counter() - start
    return {"packed": packed, "bins": bins or batch, "non_pad_share": float(np.mean(shares)),
            "examples_per_s": n_examples / dt, "tokens_per_s": slots / dt, "examples_per_batch": n_examples / batches}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "fixtures" / "llama3-tokenizer"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
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
    for packed, bins in ((True, None), (True, 4 * args.batch), (False, None)):
        print(run(examples, args.seq_len, args.batch, args.batches, packed, bins))


if __name__ == "__main__":
    main()
