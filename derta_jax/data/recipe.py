"""The official DeRTa data recipe: triples and pairs -> `{prefix, text, safe}` records.

Reproduces the authors' `generate_training_data.py` rule for rule (base template):

- helpful:        prefix = T(instruction),             text = " " + output + eos,        safe = false
- RTO ("Sorry"):  prefix = T(q),                       text = " " + r̂ + eos,             safe = true
- harmful prefix: prefix = T(q) + " " + " ".join(w[:i]), text = " " + r + eos,           safe = false
  with w = r̂.split(" "), i = randint(1, len(w) - 2) drawn for every triple with >= 3 words in
  source order, then i = 0 when the triple's source index % 3 == 0 (the draw is still consumed);
  triples with < 3 words are skipped (so i = 0 leaves a trailing space in the prefix, as there).
- vanilla safety: prefix = T(q),                       text = " " + r + eos,             safe = false
  (the official loop skips < 3-word triples here too: its `continue` comes before both appends).
- mixtures take the first N of each list, concatenated in this order:
  derta = helpful + RTO + prefix; vanilla = helpful + vanilla; recaug = helpful + prefix;
  rto_only = helpful + RTO + vanilla. Counts default to the official ones (all helpful pairs;
  3,000 + 3,000 or 6,000); asking for more than the sources hold is an error.

The official code draws from Python's unseeded global `random`; we use `random.Random(seed)` with
the same sequence of `randint` calls, so a given random state yields the official file exactly.

`cut="token"` is the paper's formula instead: the harmful-prefix record keeps prefix = T(q) and
carries `harmful` = lead + r̂; at tokenisation the first k tokens of it join the prefix, with k
uniform in [0, |r̂|] re-drawn every epoch from the run's seed (see `tokenize.py`, `loader.py`).
It uses the same triples as the word cut (>= 3 words) and no every-third rule (k = 0 already has
probability 1 / (|r̂| + 1)).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from derta_jax.data.templates import Template, base_template

RECIPES = ("derta", "vanilla", "recaug", "rto_only")
# recipe -> the safety parts it mixes, in order, with their official counts
OFFICIAL_PARTS: dict[str, dict[str, int]] = {
    "derta": {"rto": 3000, "prefix": 3000},
    "vanilla": {"vanilla": 6000},
    "recaug": {"prefix": 6000},
    "rto_only": {"rto": 3000, "vanilla": 3000},
}
CUTS = ("word", "token")


@dataclasses.dataclass(frozen=True)
class DertaRecord:
    """One training example before tokenisation; loss only on `text`, `safe` marks RTO."""

    prefix: str
    text: str
    safe: bool
    harmful: str = ""  # cut="token" only: the harmful response whose first k tokens join the prefix

    def to_json(self) -> dict[str, str]:
        """The official file's shape (`safe` as the strings "true"/"false")."""
        d = {"prefix": self.prefix, "text": self.text, "safe": "true" if self.safe else "false"}
        if self.harmful:
            d["harmful"] = self.harmful
        return d


def helpful_records(pairs: Sequence[dict], template: Template) -> list[DertaRecord]:
    return [DertaRecord(template.prompt(p["instruction"]), template.response(p["output"]), False)
            for p in pairs]


def rto_records(triples: Sequence[dict], template: Template) -> list[DertaRecord]:
    return [DertaRecord(template.prompt(t["query"]), template.response(t["harmful_response"]), True)
            for t in triples]


def _cut_words(triples: Sequence[dict], seed: int) -> list[tuple[int, list[str], int]]:
    """(source index, words of r̂, cut index i) for every triple the official rule keeps."""
    rng = random.Random(seed)
    out = []
    for index, t in enumerate(triples):
        words = t["harmful_response"].split(" ")
        if len(words) < 3:
            continue
        i = rng.randint(1, len(words) - 2)
        if index % 3 == 0:
            i = 0
        out.append((index, words, i))
    return out


def harmful_prefix_records(triples: Sequence[dict], template: Template, seed: int = 0,
                           cut: str = "word") -> list[DertaRecord]:
    if cut not in CUTS:
        raise ValueError(f"cut={cut!r}: expected one of {CUTS}")
    out = []
    for index, words, i in _cut_words(triples, seed):
        t = triples[index]
        if cut == "word":
            prefix, lead = template.harmful_prefix(t["query"], words, i)
            out.append(DertaRecord(prefix, lead + t["safe_response"] + template.eos, False))
        else:
            out.append(DertaRecord(template.prompt(t["query"]), " " + t["safe_response"] + template.eos,
                                   False, harmful=template.lead + t["harmful_response"]))
    return out


def vanilla_records(triples: Sequence[dict], template: Template) -> list[DertaRecord]:
    kept = [triples[index] for index, _, _ in _cut_words(triples, seed=0)]
    return [DertaRecord(template.prompt(t["query"]), template.response(t["safe_response"]), False)
            for t in kept]


def _take(part: str, records: list[DertaRecord], count: int) -> list[DertaRecord]:
    if count < 0:
        raise ValueError(f"{part}_count={count} must be >= 0")
    if count > len(records):
        raise ValueError(f"{part}_count={count} but the sources give only {len(records)} {part} "
                         f"examples; pass a smaller {part}_count")
    return records[:count]


def build_mixture(recipe: str, safety: Sequence[dict], helpful: Sequence[dict],
                  template: Template | None = None, seed: int = 0, cut: str = "word",
                  helpful_count: int | None = None, rto_count: int | None = None,
                  prefix_count: int | None = None, vanilla_count: int | None = None
                  ) -> list[DertaRecord]:
    """The records of one mixture, in the official order (helpful first).

    Counts left as None take the official default (all helpful pairs; see OFFICIAL_PARTS); a
    count for a part the recipe does not use is an error.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {RECIPES}")
    template = template or base_template()
    counts = {"rto": rto_count, "prefix": prefix_count, "vanilla": vanilla_count}
    parts = OFFICIAL_PARTS[recipe]
    for part, count in counts.items():
        if count is not None and part not in parts:
            raise ValueError(f"{part}_count={count} given but recipe {recipe!r} has no {part} part "
                             f"(it mixes {', '.join(parts)})")
    builders = {"rto": lambda: rto_records(safety, template),
                "prefix": lambda: harmful_prefix_records(safety, template, seed, cut),
                "vanilla": lambda: vanilla_records(safety, template)}
    helpful_recs = helpful_records(helpful, template)
    out = _take("helpful", helpful_recs, len(helpful_recs) if helpful_count is None else helpful_count)
    for part, default in parts.items():
        out += _take(part, builders[part](), default if counts[part] is None else counts[part])
    return out
