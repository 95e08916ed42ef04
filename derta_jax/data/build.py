"""Writes a DeRTa mixture as the official `{prefix, text, safe}` JSON lines.

    python -m derta_jax.data.build --recipe derta --safety S.jsonl --helpful H.jsonl --out F.jsonl \
        [--rto-count 3000 --prefix-count 3000 --vanilla-count N --helpful-count N --pairs-count N] \
        [--seed 0] [--cut word|token] [--template base|chat --tokenizer DIR] \
        [--eos-text '<|end_of_text|>'] [--skip-invalid] [--assistant-turns all|last] \
        [--safety-split train --safety-revision REV --safety-columns query=prompt,...] \
        [--helpful-split train --helpful-revision REV --helpful-columns instruction=prompt,...]

`--safety demo` / `--helpful demo` use the shipped demo data. A source is what data.safety /
data.helpful take (JSON lines, parquet/arrow/json, a dataset folder or a hub name), and the
`--<kind>-split/-revision/-columns` flags are data.<kind>_split/_revision/_columns. The records are those training
builds from the same arguments (`pipeline.mixture_records`; data.eos_text is --eos-text). Counts
left out are the official ones, or what the sources have when that is fewer (logged). The output
can be read by the official training code (token-cut records carry extra `harmful` and `cut_text`
fields it ignores). `--recipe preference` writes `{prefix, chosen, rejected}` pairs instead
(the DPO baseline's data: helpful rows with a `rejected` answer, then the safety triples; `--pairs-count`).
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

from derta_jax import cli, storage
from derta_jax.data import pipeline, records
from derta_jax.data.recipe import ALL_RECIPES, CUTS, PARTS
from derta_jax.data.templates import ASSISTANT_TURNS, OFFICIAL_EOS


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m derta_jax.data.build", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=ALL_RECIPES, required=True)
    for kind, rows in (("safety", "triples"), ("helpful", "pairs")):
        p.add_argument(f"--{kind}", required=True, help=f"{kind} {rows}: JSON lines, parquet/arrow/"
                       "json, a dataset folder or hub name, or 'demo'")
        p.add_argument(f"--{kind}-split", default=records.Source.split,
                       help="split of a hub name or a saved DatasetDict")
        p.add_argument(f"--{kind}-revision", default=records.Source.revision,
                       help="hub names: branch, tag or commit (default: the default branch)")
        p.add_argument(f"--{kind}-columns", default=records.Source.columns,
                       help="our field=its column,... (default: our field names)")
    p.add_argument("--out", required=True)
    for part in PARTS:
        p.add_argument(f"--{part}-count", type=int, default=None, help="default: all pairs (official)"
                       if part in ("helpful", "pairs")
                       else "default: the official count, or all the sources give")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cut", choices=CUTS, default="word")
    p.add_argument("--template", choices=("base", "chat"), default="base")
    p.add_argument("--eos-text", default=OFFICIAL_EOS,
                   help="end of every base-template response (default: the official %(default)s; "
                        "the chat template ends with its own end-of-turn token)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (needed for --template chat)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad lines (counted) instead of failing")
    p.add_argument("--assistant-turns", choices=ASSISTANT_TURNS, default=ASSISTANT_TURNS[0],
                   help="multi-turn rows: the assistant turns that carry loss")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the records to --out (0); a user error raises ValueError (one line, exit 2 from the
    command line)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    for kind in ("safety", "helpful"):
        if getattr(args, kind) == "demo":
            setattr(args, kind, "")  # pipeline.source: '' is the demo file
    tokenizer = None
    if args.tokenizer:
        from derta_jax.checkpoints.model_dir import load_tokenizer  # heavy: only when asked for
        tokenizer = load_tokenizer(args.tokenizer)
    recs = pipeline.mixture_records(
        args.recipe, pipeline.source(args, "safety"), pipeline.source(args, "helpful"), tokenizer,
        args.template, args.cut, args.seed, args.skip_invalid, args.eos_text, args.assistant_turns,
        **{f"{part}_count": getattr(args, f"{part}_count") for part in PARTS})
    with storage.path(args.out).open("w", encoding="utf-8") as f:  # a local path or a URL
        for r in recs:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    print(f"wrote {len(recs)} records ({args.recipe}) to {args.out}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
