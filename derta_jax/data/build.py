"""Writes a DeRTa mixture as the official `{prefix, text, safe}` JSON lines.

    python -m derta_jax.data.build --recipe derta --safety S.jsonl --helpful H.jsonl --out F.jsonl \
        [--rto-count 3000 --prefix-count 3000 --vanilla-count N --helpful-count N] \
        [--seed 0] [--cut word|token] [--template base|chat --tokenizer DIR] \
        [--eos-text '<|end_of_text|>'] [--skip-invalid]

`--safety demo` / `--helpful demo` use the shipped demo data. The records are those training
builds from the same arguments (`pipeline.mixture_records`; data.eos_text is --eos-text). Counts
left out are the official ones, or what the sources have when that is fewer (logged). The output
can be read by the official training code (token-cut records carry extra `harmful` and `cut_text`
fields it ignores).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from derta_jax.data import pipeline
from derta_jax.data.recipe import CUTS, PARTS, RECIPES
from derta_jax.data.templates import OFFICIAL_EOS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m derta_jax.data.build", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=RECIPES, required=True)
    p.add_argument("--safety", required=True, help="safety triples JSON lines, or 'demo'")
    p.add_argument("--helpful", required=True, help="helpful pairs JSON lines, or 'demo'")
    p.add_argument("--out", required=True)
    for part in PARTS:
        p.add_argument(f"--{part}-count", type=int, default=None, help="default: all pairs (official)"
                       if part == "helpful" else "default: the official count, or all the sources give")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cut", choices=CUTS, default="word")
    p.add_argument("--template", choices=("base", "chat"), default="base")
    p.add_argument("--eos-text", default=OFFICIAL_EOS,
                   help="end of every base-template response (default: the official %(default)s; "
                        "the chat template ends with its own end-of-turn token)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (needed for --template chat)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad lines (counted) instead of failing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    safety = pipeline.DEMO_SAFETY if args.safety == "demo" else args.safety
    helpful = pipeline.DEMO_HELPFUL if args.helpful == "demo" else args.helpful
    try:
        tokenizer = None
        if args.tokenizer:
            from derta_jax.checkpoints.model_dir import load_tokenizer  # heavy: only when asked for
            tokenizer = load_tokenizer(args.tokenizer)
        recs = pipeline.mixture_records(
            args.recipe, safety, helpful, tokenizer, args.template, args.cut, args.seed,
            args.skip_invalid, args.eos_text,
            **{f"{part}_count": getattr(args, f"{part}_count") for part in PARTS})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.out, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    print(f"wrote {len(recs)} records ({args.recipe}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
