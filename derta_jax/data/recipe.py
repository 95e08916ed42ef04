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
  rto_only = helpful + RTO + vanilla. A count left at its default (None or -1) is the official
  one (`RECIPES`; all helpful pairs), sliced as the official script does (`[:3000]`): sources
  with fewer examples give what they have, with a warning "rto: 9 of the official 3,000 examples
  (all the sources give)". An explicit count larger than the sources hold is an error.

The official code draws from Python's unseeded global `random`; we use `random.Random(seed)` with
the same sequence of `randint` calls, so a given random state yields the official file exactly.

`cut="token"` is the paper's formula instead: the harmful-prefix record keeps prefix = T(q), its
text is the vanilla one (T.response(r), what k = 0 gives), and it carries `harmful` = lead + r̂
and, for the chat template, `cut_text` = " " + text (after k > 0 harmful tokens a space joins the
safe response, as in the word cut). At tokenisation the first k tokens of `harmful` join the
prefix, with k uniform in [0, |r̂|] re-drawn every epoch from the run's seed (see `tokenize.py`,
`loader.py`). It uses the same triples as the word cut (>= 3 words) and no every-third rule
(k = 0 already has probability 1 / (|r̂| + 1)).

Multi-turn rows (`messages`, chat template): T(q) is the conversation before the last assistant
turn (`Template.conversation`), so the responses, the harmful prefix and the RTO positions all sit
in the last assistant turn; with `Template.all_turns` each record also carries the character
spans of the earlier assistant turns (`DertaRecord.turns`), which carry plain MLE loss.

`preference` (not a DeRTa mixture) gives the DPO baseline's pairs `{prefix, chosen, rejected}`
(`PairRecord`): helpful rows that have a `rejected` answer, then every safety triple with the safe
response chosen and the harmful one rejected (`helpful_count`, `pairs_count`; default all).
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Mapping, Sequence

from derta_jax.data.templates import Template, base_template

log = logging.getLogger(__name__)

# The recipes: name -> the safety parts it mixes after all helpful pairs, in order, with their
# official counts (derta-method.md, "Mixtures"). The one list of recipe names and counts.
RECIPES: Mapping[str, Mapping[str, int]] = {
    "derta": {"rto": 3000, "prefix": 3000},
    "vanilla": {"vanilla": 6000},
    "recaug": {"prefix": 6000},
    "rto_only": {"rto": 3000, "vanilla": 3000},
}
PREFERENCE = "preference"  # the pairs recipe (loss.objective dpo | ipo | simpo): PairRecords
ALL_RECIPES = (*RECIPES, PREFERENCE)
PARTS = ("helpful", "rto", "prefix", "vanilla", "pairs")  # each has a count argument `{part}_count`
OFFICIAL = -1  # a count meaning "the official one" (None means the same)
CUTS = ("word", "token")


def safety_counts(recipe: str, total: int | None = None) -> dict[str, int]:
    """`{part}_count` of each safety part of `recipe`: the official counts, or `total` examples
    split in the official proportions (earlier parts rounded down, the last takes the rest)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {', '.join(RECIPES)}")
    parts = RECIPES[recipe]
    if total is None:
        return {f"{p}_count": n for p, n in parts.items()}
    if total < 0:
        raise ValueError(f"total={total} must be >= 0")
    official, out = sum(parts.values()), {}
    for p, n in list(parts.items())[:-1]:
        out[f"{p}_count"] = total * n // official
    out[f"{list(parts)[-1]}_count"] = total - sum(out.values())
    return out


@dataclasses.dataclass(frozen=True)
class DertaRecord:
    """One training example before tokenisation; loss only on `text`, `safe` marks RTO."""

    prefix: str
    text: str
    safe: bool
    harmful: str = ""  # cut="token" only: the harmful response whose first k tokens join the prefix
    cut_text: str = ""  # cut="token", when it differs from `text`: the text after k > 0 of them
    # multi-turn: [start, end) character spans of `prefix` that carry loss too (earlier assistant
    # turns; templates.Template.conversation); never RTO
    turns: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The official file's shape (`safe` as the strings "true"/"false"), plus the token-cut
        and multi-turn fields when set (the official code ignores them)."""
        d: dict[str, Any] = {"prefix": self.prefix, "text": self.text, "safe": "true" if self.safe else "false"}
        d.update({k: v for k, v in (("harmful", self.harmful), ("cut_text", self.cut_text)) if v})
        if self.turns:
            d["turns"] = [list(span) for span in self.turns]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DertaRecord":
        """The inverse of `to_json` (an official file's line too)."""
        return cls(d["prefix"], d["text"], d["safe"] == "true", d.get("harmful", ""),
                   d.get("cut_text", ""), tuple(tuple(span) for span in d.get("turns", ())))


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """One preference pair before tokenisation: two responses to one prompt, loss only on them."""

    prefix: str
    chosen: str
    rejected: str

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "chosen": self.chosen, "rejected": self.rejected}


def _prompt(template: Template, row: Mapping[str, Any], query_key: str) -> tuple[str, tuple]:
    """A row's prompt and loss spans: a flat row's query, or a chat's conversation so far."""
    if "messages" not in row:
        return template.prompt(row[query_key]), ()
    try:
        return template.conversation(row["messages"])
    except ValueError as e:
        raise ValueError(f"{row['id']}: {e}") from None


def helpful_records(pairs: Sequence[dict], template: Template) -> list[DertaRecord]:
    out = []
    for p in pairs:
        prompt, turns = _prompt(template, p, "instruction")
        out.append(DertaRecord(prompt, template.response(p["output"]), False, turns=turns))
    return out


def rto_records(triples: Sequence[dict], template: Template) -> list[DertaRecord]:
    out = []
    for t in triples:
        prompt, turns = _prompt(template, t, "query")
        out.append(DertaRecord(prompt, template.response(t["harmful_response"]), True, turns=turns))
    return out


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
        prompt, turns = _prompt(template, t, "query")
        if cut == "word":
            prefix, lead = template.harmful_prefix(prompt, words, i)
            out.append(DertaRecord(prefix, lead + t["safe_response"] + template.eos, False, turns=turns))
        else:
            text = template.response(t["safe_response"])
            joined = " " + t["safe_response"] + template.eos
            out.append(DertaRecord(prompt, text, False, harmful=template.lead + t["harmful_response"],
                                   cut_text="" if joined == text else joined, turns=turns))
    return out


def vanilla_records(triples: Sequence[dict], template: Template) -> list[DertaRecord]:
    out = []
    for index, _, _ in _cut_words(triples, seed=0):
        prompt, turns = _prompt(template, triples[index], "query")
        out.append(DertaRecord(prompt, template.response(triples[index]["safe_response"]), False,
                               turns=turns))
    return out


def _is_official(count: int | None) -> bool:
    return count is None or count == OFFICIAL


def _take(part: str, records: list[DertaRecord], count: int | None,
          official: int | None) -> list[DertaRecord]:
    """The first `count` records; an official count (`official`, None = all) takes up to it."""
    if _is_official(count):
        if official is not None and len(records) < official:
            log.warning("%s: %s of the official %s examples (all the sources give)",
                        part, f"{len(records):,}", f"{official:,}")
        return records[:official]
    if count < 0:
        raise ValueError(f"{part}_count={count} must be >= 0 (or {OFFICIAL} / None: the official count)")
    if count > len(records):
        raise ValueError(f"{part}_count={count} but the sources give only {len(records)} {part} "
                         f"examples; pass a smaller {part}_count")
    return records[:count]


def preference_records(safety: Sequence[dict], helpful: Sequence[dict], template: Template,
                       helpful_count: int | None = None, pairs_count: int | None = None
                       ) -> list[PairRecord]:
    """The DPO baseline's pairs (derta-method.md, "Hyperparameters"): helpful rows with a
    `rejected` answer (chosen: their `output`), then safety triples (chosen: the safe response,
    rejected: the harmful one). Counts left as None or -1 take all; helpful rows without
    `rejected` are left out and counted in the log. Only the last assistant turn of a multi-turn
    row carries loss."""
    with_rejected = [p for p in helpful if "rejected" in p]
    if len(with_rejected) < len(helpful):
        log.info("preference: %d of %d helpful rows have no 'rejected' answer and are left out",
                 len(helpful) - len(with_rejected), len(helpful))
    if not _is_official(helpful_count) and helpful_count > len(with_rejected):
        raise ValueError(f"helpful_count={helpful_count} but only {len(with_rejected)} helpful rows "
                         "have a 'rejected' answer (the preference recipe uses only those)")
    out = []
    for p in _take("helpful", with_rejected, helpful_count, None):
        prompt, _ = _prompt(template, p, "instruction")
        out.append(PairRecord(prompt, template.response(p["output"]),
                              template.response(p["rejected"])))
    n_helpful = len(out)
    for t in _take("pairs", list(safety), pairs_count, None):
        prompt, _ = _prompt(template, t, "query")
        out.append(PairRecord(prompt, template.response(t["safe_response"]),
                              template.response(t["harmful_response"])))
    log.info("recipe preference: %d helpful + %d safety pairs", n_helpful, len(out) - n_helpful)
    return out


def build_mixture(recipe: str, safety: Sequence[dict], helpful: Sequence[dict],
                  template: Template | None = None, seed: int = 0, cut: str = "word",
                  helpful_count: int | None = None, rto_count: int | None = None,
                  prefix_count: int | None = None, vanilla_count: int | None = None,
                  pairs_count: int | None = None) -> list[DertaRecord] | list[PairRecord]:
    """The records of one mixture, in the official order (helpful first); PairRecords for the
    preference recipe.

    Counts left as None or -1 take the official ones (all helpful pairs; see RECIPES), or what
    the sources have when that is fewer; a count for a part the recipe does not use is an error.
    """
    if recipe not in ALL_RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {', '.join(ALL_RECIPES)}")
    template = template or base_template()
    counts = {"rto": rto_count, "prefix": prefix_count, "vanilla": vanilla_count,
              "pairs": pairs_count}
    if recipe == PREFERENCE:
        for part in ("rto", "prefix", "vanilla"):
            if not _is_official(counts[part]):
                raise ValueError(f"{part}_count={counts[part]} given but recipe {recipe!r} has no "
                                 f"{part} part (it has helpful and pairs)")
        return preference_records(safety, helpful, template, helpful_count, pairs_count)
    parts = RECIPES[recipe]
    for part, count in counts.items():
        if not _is_official(count) and part not in parts:
            raise ValueError(f"{part}_count={count} given but recipe {recipe!r} has no {part} part "
                             f"(it mixes {', '.join(parts)})")
    builders = {"rto": lambda: rto_records(safety, template),
                "prefix": lambda: harmful_prefix_records(safety, template, seed, cut),
                "vanilla": lambda: vanilla_records(safety, template)}
    taken = {"helpful": _take("helpful", helpful_records(helpful, template), helpful_count, None)}
    for part, official in parts.items():
        taken[part] = _take(part, builders[part](), counts[part], official)
    out = [r for recs in taken.values() for r in recs]
    log.info("recipe %s: %s = %d records", recipe,
             " + ".join(f"{len(recs):,} {part}" for part, recs in taken.items()), len(out))
    return out
