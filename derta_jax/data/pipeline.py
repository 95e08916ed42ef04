"""One call from files to tokenised examples, for the trainer and the CLI.

    from derta_jax.data import pipeline, loader
    examples, stats = pipeline.training_examples(
        tokenizer, recipe="derta", safety=pipeline.DEMO_SAFETY, helpful=pipeline.DEMO_HELPFUL,
        rto_count=100, prefix_count=100, max_length=256, template="chat", cut="word")
    it = loader.make_loader(examples, batch_size_per_host=8, seq_len=256, seed=0)
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

from derta_jax.data import records as records_mod
from derta_jax.data.recipe import DertaRecord, build_mixture
from derta_jax.data.refusal import DEFAULT_REFUSAL, refusal_token_id
from derta_jax.data.templates import make_template
from derta_jax.data.tokenize import BuildStats, TokenizedExample, build_examples

log = logging.getLogger(__name__)

DEMO_DIR = pathlib.Path(__file__).resolve().parent / "demo"
DEMO_SAFETY = DEMO_DIR / "safety.jsonl"
DEMO_HELPFUL = DEMO_DIR / "helpful.jsonl"
DEMO_EVAL_DIR = DEMO_DIR / "eval"


def mixture_records(recipe: str, safety: str | os.PathLike, helpful: str | os.PathLike,
                    tokenizer: Any = None, template: str = "base", cut: str = "word", seed: int = 0,
                    skip_invalid: bool = False, eos: str | None = None,
                    **counts: int | None) -> list[DertaRecord]:
    """Reads and validates both files, then builds the recipe's `{prefix, text, safe}` records.

    `counts`: helpful_count, rto_count, prefix_count, vanilla_count (None = official default).
    """
    triples, safety_report = records_mod.read_jsonl(safety, "safety", skip_invalid)
    pairs, helpful_report = records_mod.read_jsonl(helpful, "helpful", skip_invalid)
    log.info("read %s; %s", safety_report, helpful_report)
    return build_mixture(recipe, triples, pairs, make_template(template, tokenizer, eos), seed, cut,
                         **counts)


def training_examples(tokenizer: Any, recipe: str = "derta",
                      safety: str | os.PathLike = DEMO_SAFETY,
                      helpful: str | os.PathLike = DEMO_HELPFUL, max_length: int = 1024,
                      refusal_token: str = DEFAULT_REFUSAL, template: str = "base",
                      cut: str = "word", seed: int = 0, add_bos: bool | None = None,
                      skip_invalid: bool = False, **counts: int | None
                      ) -> tuple[list[TokenizedExample], BuildStats]:
    """Files -> tokenised examples ready for `loader.make_loader`, and the build counts."""
    recs = mixture_records(recipe, safety, helpful, tokenizer, template, cut, seed, skip_invalid,
                           **counts)
    refusal_id = refusal_token_id(tokenizer, refusal_token)
    examples, stats = build_examples(recs, tokenizer, max_length, refusal_id, template, add_bos)
    log.info("recipe %s: %s", recipe, stats)
    return examples, stats
