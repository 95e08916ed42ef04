"""Records -> token ids with the official masking; per-example arrays in the batch contract.

Rules (the official `preprocess_function`, plus what it leaves open):

- `prefix` and `prefix + text` are tokenised separately; the first len(tokens(prefix)) labels of
  the full sequence are masked. Sequences are truncated on the right to `max_length` (the block
  size), so an over-long example keeps its prompt and as much of the response as fits; an
  example left with no supervised label is dropped and counted in `BuildStats`.
- BOS, decided here and not by the tokenizer: text is always encoded with
  `add_special_tokens=False`, then `bos_token_id` is prepended when `add_bos` is true. The default
  (`add_bos=None`) prepends it for the base template (the official LLaMA-3 runs had one: their
  tokenizer's post-processor added `<|begin_of_text|>`) unless the tokenizer's chat template
  writes that token literally as a turn marker (SmolLM2's bos is `<|im_start|>`, not a document
  start), and never for the chat template, whose text already carries whatever BOS the model
  wants (LLaMA-3's `{{ bos_token }}`). Tokenizers whose post-processor adds a BOS and those that
  do not therefore give the same ids.
- Alignment (architecture.md, "Data"): the logits at position t predict `targets[t]`, which is
  tokens[t + 1]; `loss_mask[t]` is set when label t + 1 is supervised. For an RTO record
  (`safe`) every supervised target is the refusal id and `rto_mask = loss_mask`: the positions
  from the last prompt token to the one before the final eos, i.e. P(sorry | q, r̂<t) for
  t = 0..|r̂|. The last position of an example never carries loss.
- Token-level cut (`DertaRecord.harmful`): tokens = tokens(prefix) + tokens(harmful) +
  tokens(cut_text or text), each encoded separately; `materialize(example, k)` keeps only the
  first k harmful tokens, which join the masked prompt. k = 0 gives `uncut`: prefix + text
  encoded together like a plain record, i.e. the vanilla example (with the chat template the text
  after k > 0 harmful tokens starts with a joining space, the text after none does not).
  k is drawn by the loader (uniform in [0, max_cut]); `TokenizedExample.length(k)` is the
  example's length for that k before the loader's truncation.
- Multi-turn records (`DertaRecord.turns`, earlier assistant turns inside the prefix): the
  prefix up to each span's start and end is tokenised too, and the token counts are the span's
  labels (`TokenizedExample.turns`), supervised with plain MLE (never RTO). Each such token list
  must be a prefix of the prefix's tokens, else the boundary is not stable under the tokenizer:
  an error naming the record and showing its text. The drop rule above looks at the last turn.
- Preference pairs (`PairRecord`, `build_pair_examples`): prefix + chosen and prefix + rejected
  are tokenised like plain records, each cut to max_length // 2; `materialize` gives both, one
  after the other, and the packer makes them two neighbouring segments of one row.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from derta_jax.data.recipe import DertaRecord, PairRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One example's ids. Labels of the first `prompt_len` tokens are masked.

    With a token cut, tokens[prompt_len : prompt_len + cut_len] are the harmful response r̂, of
    which an epoch keeps the first k <= max_cut (capped so that one supervised label fits), and
    `uncut` holds the ids for k = 0. `refusal_id >= 0` marks an RTO example.
    """

    tokens: np.ndarray  # int32 [n]
    prompt_len: int
    refusal_id: int = -1
    cut_len: int = 0
    max_cut: int = 0
    uncut: np.ndarray | None = None  # token cut: int32 ids with no harmful token (k = 0)
    turns: tuple[tuple[int, int], ...] = ()  # [start, end) token spans of the prompt with MLE labels
    rejected: np.ndarray | None = None  # a preference pair: int32 ids of prompt + rejected response
    # (`tokens` holds prompt + chosen; both share prompt_len)
    ref_logps: np.ndarray | None = None  # float32 reference log-probs, one per position of
    # materialize's arrays (chosen then rejected for a pair); training/reference.py

    @property
    def is_rto(self) -> bool:
        return self.refusal_id >= 0

    def length(self, k: int = 0) -> int:
        """`len(materialize(self, L, k)["tokens"]) == min(self.length(k), L)` for every L (for a
        pair: the two sequences together)."""
        if self.rejected is not None:
            return len(self.tokens) + len(self.rejected)
        if k == 0 and self.uncut is not None:
            return len(self.uncut)
        return len(self.tokens) - self.cut_len + k


@dataclasses.dataclass
class BuildStats:
    examples: int = 0
    truncated: int = 0  # kept, but the response was cut at max_length
    dropped_no_supervised: int = 0  # the prompt alone fills max_length

    def add(self, other: "BuildStats") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def __str__(self) -> str:
        return (f"{self.examples} examples, {self.truncated} truncated to fit, "
                f"{self.dropped_no_supervised} dropped (no supervised token left)")


def resolve_add_bos(tokenizer: Any, template_kind: str, add_bos: bool | None) -> bool:
    if add_bos is None:
        bos = tokenizer.bos_token
        turn_marker = bool(bos) and bos in (getattr(tokenizer, "chat_template", None) or "")
        add_bos = template_kind == "base" and tokenizer.bos_token_id is not None and not turn_marker
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError(f"add_bos=True but tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} "
                         "has no bos_token_id")
    return add_bos


def _encode(tokenizer: Any, texts: list[str], bos: list[int]) -> list[list[int]]:
    if not texts:
        return []
    return [bos + list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def build_examples(records: Sequence[DertaRecord], tokenizer: Any, max_length: int,
                   refusal_id: int | None = None, template_kind: str = "base",
                   add_bos: bool | None = None) -> tuple[list[TokenizedExample], BuildStats]:
    """Tokenises records (see the module docstring); returns the kept examples and the counts."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2")
    if refusal_id is None and any(r.safe for r in records):
        raise ValueError("records contain RTO examples (safe=true) but no refusal_id was given")
    bos = [tokenizer.bos_token_id] if resolve_add_bos(tokenizer, template_kind, add_bos) else []
    prefixes = _encode(tokenizer, [r.prefix for r in records], bos)
    full = _encode(tokenizer, [r.prefix + r.text for r in records], bos)
    turns = _turn_spans(records, prefixes, tokenizer, bos)
    cut = [i for i, r in enumerate(records) if r.harmful]
    harmful = dict(zip(cut, _encode(tokenizer, [records[i].harmful for i in cut], [])))
    after = dict(zip(cut, _encode(tokenizer, [records[i].cut_text or records[i].text for i in cut], [])))
    stats, out = BuildStats(), []
    for i, r in enumerate(records):
        p, natural = len(prefixes[i]), len(full[i])  # natural: the length with k = 0
        rid = refusal_id if r.safe else -1
        if r.harmful:
            n_cut = len(harmful[i])
            ex = TokenizedExample(np.asarray(prefixes[i] + harmful[i] + after[i], np.int32), p, rid,
                                  n_cut, max(0, min(n_cut, max_length - 1 - p)),
                                  uncut=np.asarray(full[i][:max_length], np.int32), turns=turns[i])
        else:
            ex = TokenizedExample(np.asarray(full[i][:max_length], np.int32), p, rid, turns=turns[i])
        if min(natural, max_length) - p < 1:
            stats.dropped_no_supervised += 1
            continue
        stats.truncated += natural > max_length
        out.append(ex)
    stats.examples = len(out)
    return out, stats


def build_pair_examples(records: Sequence[PairRecord], tokenizer: Any, max_length: int,
                        template_kind: str = "base", add_bos: bool | None = None
                        ) -> tuple[list[TokenizedExample], BuildStats]:
    """Preference pairs -> examples holding both sequences (`rejected`). `max_length` is the
    pair's budget, as one packed row holds both: each sequence keeps max_length // 2 tokens; a
    pair either of whose responses is left with no supervised label is dropped and counted."""
    if max_length < 4:
        raise ValueError(f"max_length={max_length} must be >= 4 for pairs")
    half = max_length // 2
    bos = [tokenizer.bos_token_id] if resolve_add_bos(tokenizer, template_kind, add_bos) else []
    prefixes = _encode(tokenizer, [r.prefix for r in records], bos)
    chosen = _encode(tokenizer, [r.prefix + r.chosen for r in records], bos)
    rejected = _encode(tokenizer, [r.prefix + r.rejected for r in records], bos)
    stats, out = BuildStats(), []
    for p_ids, c, r in zip(prefixes, chosen, rejected):
        p = len(p_ids)
        if min(len(c), half) - p < 1 or min(len(r), half) - p < 1:
            stats.dropped_no_supervised += 1
            continue
        stats.truncated += len(c) > half or len(r) > half
        out.append(TokenizedExample(np.asarray(c[:half], np.int32), p,
                                    rejected=np.asarray(r[:half], np.int32)))
    stats.examples = len(out)
    return out, stats


def _turn_spans(records: Sequence[DertaRecord], prefixes: list[list[int]], tokenizer: Any,
                bos: list[int]) -> list[tuple[tuple[int, int], ...]]:
    """Each record's `turns` as token spans: the token counts of its prefix up to each boundary."""
    bounds = [(i, b) for i, r in enumerate(records) for span in r.turns for b in span]
    counts = {}
    for (i, b), ids in zip(bounds, _encode(tokenizer, [records[i].prefix[:b] for i, b in bounds], bos)):
        if prefixes[i][:len(ids)] != ids:
            raise ValueError(f"record {i}: its prefix up to character {b} (an assistant turn's "
                             "boundary) does not tokenise as the start of the whole prefix, so the "
                             f"loss mask cannot follow the turn (data.assistant_turns=last avoids "
                             f"it); prefix: {records[i].prefix!r}")
        counts[i, b] = len(ids)
    return [tuple((counts[i, s], counts[i, e]) for s, e in r.turns) for i, r in enumerate(records)]


def materialize(example: TokenizedExample, max_length: int, k: int = 0) -> dict[str, np.ndarray]:
    """The example's [n] arrays (tokens, targets, loss_mask, rto_mask, and ref_logps when it has
    them), n <= max_length. A pair gives its chosen then its rejected sequence, with `pieces`
    (0 chosen, 1 rejected: one segment each in a row) and `positions` restarting at the second.

    `k`: how many harmful tokens a token-cut example keeps this epoch (0 <= k <= max_cut).
    """
    if not 0 <= k <= example.max_cut:
        raise ValueError(f"cut k={k} outside [0, {example.max_cut}]")
    if example.rejected is not None:
        parts = [_sequence(ids, example.prompt_len, max_length, example) for ids in
                 (example.tokens, example.rejected)]
        out = {key: np.concatenate([a[key] for a in parts]) for key in parts[0]}
        out["pieces"] = np.repeat(np.arange(2, dtype=np.int32), [len(a["tokens"]) for a in parts])
        out["positions"] = np.concatenate([np.arange(len(a["tokens"]), dtype=np.int32)
                                           for a in parts])
        if len(out["tokens"]) > max_length:
            raise ValueError(f"a pair of {len(out['tokens'])} tokens does not fit "
                             f"max_length={max_length}")
    else:
        p, ids = example.prompt_len, example.tokens
        if k == 0 and example.uncut is not None:
            ids = example.uncut
        elif example.cut_len:
            ids = np.concatenate([ids[:p + k], ids[p + example.cut_len:]])
            p += k
        out = _sequence(ids, p, max_length, example)
    if example.ref_logps is not None:
        out["ref_logps"] = example.ref_logps[:len(out["tokens"])].astype(np.float32)
    return out


def _sequence(ids: np.ndarray, p: int, max_length: int, example: TokenizedExample
              ) -> dict[str, np.ndarray]:
    """One sequence's arrays: labels from token p on supervised (RTO for an RTO example)."""
    ids = ids[:max_length]
    n = len(ids)
    targets = np.zeros(n, np.int32)
    targets[:-1] = ids[1:]
    loss = np.zeros(n, bool)
    loss[max(p - 1, 0):n - 1] = True
    rto = loss & example.is_rto
    for start, end in example.turns:  # earlier assistant turns: labels start..end-1, MLE
        loss[max(start - 1, 0):min(end - 1, n - 1)] = True
    if example.is_rto:
        targets[rto] = example.refusal_id
    return {"tokens": ids.astype(np.int32), "targets": targets, "loss_mask": loss, "rto_mask": rto}
