"""One call from files to tokenised examples, for the trainer and the CLI.

    from derta_jax.data import pipeline, loader
    examples, stats = pipeline.training_examples(
        tokenizer, recipe="derta", safety=pipeline.DEMO_SAFETY, helpful=pipeline.DEMO_HELPFUL,
        rto_count=100, prefix_count=100, max_length=256, template="chat", cut="word")

`mixture_records` is the one path from sources (JSON lines, Hugging Face `datasets` files, folders
and hub names: `records.Source`) to records: `python -m derta_jax.data.build` writes
its records and `training_examples` tokenises them, so both give the same records from the same
arguments (the base template's eos is `eos_text`, the official literal by default, never the
tokenizer's eos).
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Iterator

from derta_jax.data import records as records_mod
from derta_jax.data.recipe import PREFERENCE, DertaRecord, PairRecord, build_mixture
from derta_jax.data.records import Source
from derta_jax.data.refusal import DEFAULT_REFUSAL, refusal_token_id
from derta_jax.data.templates import OFFICIAL_EOS, make_template
from derta_jax.data.tokenize import (BuildStats, TokenizedExample, build_examples,
                                     build_pair_examples)

log = logging.getLogger(__name__)

DEMO_DIR = pathlib.Path(__file__).resolve().parent / "demo"
DEMO_SAFETY = DEMO_DIR / "safety.jsonl"
DEMO_HELPFUL = DEMO_DIR / "helpful.jsonl"
DEMO_EVAL_DIR = DEMO_DIR / "eval"
CHUNK = 4096  # records tokenised at a time by tokenised_chunks


def source(keys: Any, kind: str) -> Source:
    """`kind`'s (safety | helpful) Source from the data keys `<kind>`, `<kind>_split`,
    `<kind>_revision` and `<kind>_columns` of `keys` (training's DataConfig, data.build's flags);
    an empty `<kind>` is the bundled demo file."""
    return Source(getattr(keys, kind) or DEMO_DIR / f"{kind}.jsonl", getattr(keys, f"{kind}_split"),
                  getattr(keys, f"{kind}_revision"), getattr(keys, f"{kind}_columns"))


def mixture_records(recipe: str, safety: Source | str | os.PathLike,
                    helpful: Source | str | os.PathLike,
                    tokenizer: Any = None, template: str = "base", cut: str = "word", seed: int = 0,
                    skip_invalid: bool = False, eos_text: str = OFFICIAL_EOS,
                    assistant_turns: str = "all", **counts: int | None
                    ) -> list[DertaRecord] | list[PairRecord]:
    """Reads and validates both sources, then builds the recipe's `{prefix, text, safe}` records.

    `safety`, `helpful`: a path or hub name, or a `records.Source` (split, revision, columns).
    `tokenizer`: only for template="chat". `eos_text`: the base template's eos string.
    `assistant_turns`: all | last, the assistant turns of multi-turn rows that carry loss.
    `counts`: helpful_count, rto_count, prefix_count, vanilla_count, pairs_count (None or -1 =
    official). The preference recipe gives PairRecords.
    """
    triples, safety_report = records_mod.read_rows(safety, "safety", skip_invalid)
    pairs, helpful_report = records_mod.read_rows(helpful, "helpful", skip_invalid)
    log.info("read %s; %s", safety_report, helpful_report)
    return build_mixture(recipe, triples, pairs,
                         make_template(template, tokenizer, eos_text, assistant_turns), seed, cut,
                         **counts)


def training_examples(tokenizer: Any, recipe: str = "derta", **options: Any
                      ) -> tuple[list[TokenizedExample], BuildStats]:
    """Sources -> tokenised examples ready for the loader, and the build counts. `options`:
    those of `tokenised_chunks` (sources, max_length, template, cut, seed, counts, ...)."""
    stats, examples = BuildStats(), []
    for chunk in tokenised_chunks(stats, tokenizer, recipe, **options):
        examples.extend(chunk)
    return examples, stats


def tokenised_chunks(stats: BuildStats, tokenizer: Any, recipe: str = "derta",
                     safety: Source | str | os.PathLike = DEMO_SAFETY,
                     helpful: Source | str | os.PathLike = DEMO_HELPFUL, max_length: int = 1024,
                     refusal_token: str = DEFAULT_REFUSAL, template: str = "base",
                     cut: str = "word", seed: int = 0, add_bos: bool | None = None,
                     skip_invalid: bool = False, eos_text: str = OFFICIAL_EOS,
                     assistant_turns: str = "all", chunk_size: int = CHUNK,
                     **counts: int | None) -> Iterator[list[TokenizedExample]]:
    """`training_examples`, tokenised `chunk_size` records at a time (each record is tokenised
    on its own, so the examples are the same): data/prepared.py writes them without ever holding
    all of them. `stats` is filled in as it goes and logged at the end."""
    recs = mixture_records(recipe, safety, helpful, tokenizer, template, cut, seed, skip_invalid,
                           eos_text, assistant_turns, **counts)
    if template == "base":
        _warn_if_not_one_token(tokenizer, eos_text)
    if recipe == PREFERENCE:
        def build(part):
            return build_pair_examples(part, tokenizer, max_length, template, add_bos)
    else:
        refusal_id = refusal_token_id(tokenizer, refusal_token)

        def build(part):
            return build_examples(part, tokenizer, max_length, refusal_id, template, add_bos)
    for start in range(0, len(recs), chunk_size):
        examples, part_stats = build(recs[start:start + chunk_size])
        stats.add(part_stats)
        yield examples
    log.info("recipe %s: %s", recipe, stats)


def _warn_if_not_one_token(tokenizer: Any, eos_text: str) -> None:
    ids = tokenizer(eos_text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        log.warning("eos_text %r is %d tokens with tokenizer %r (not one of its special tokens): "
                    "the model learns to write it out and generation does not stop there; set "
                    "eos_text to the tokenizer's eos (%r) or use the chat template", eos_text,
                    len(ids), getattr(tokenizer, "name_or_path", "?"), tokenizer.eos_token)
