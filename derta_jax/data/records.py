"""JSON-lines input files, validated line by line.

Three kinds of file:

- `safety`: triples `{query, harmful_response, safe_response}`; the official BeaverTails-derived
  release writes them as `{instruction, output, safe_response}`, accepted too.
- `helpful`: pairs `{instruction, output}` (the official WizardLM-uncensored files).
- `eval`: `{question}` with an optional `answer` (string or number, kept as a string).

A bad line (not JSON, not an object, a missing, empty or non-string field, both spellings of one
field) raises `ValueError` naming the file, the line number and the reason. With
`skip_invalid=True` it is skipped instead and counted by reason in the returned `ReadReport`,
which is also logged. Blank lines are ignored. Extra keys are ignored.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# kind -> {our field: accepted spellings, in order}
FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "safety": {"query": ("query", "instruction"), "harmful_response": ("harmful_response", "output"),
               "safe_response": ("safe_response",)},
    "helpful": {"instruction": ("instruction",), "output": ("output",)},
    "eval": {"question": ("question",)},
}


@dataclasses.dataclass
class ReadReport:
    """What reading one file kept and skipped (skipped: reason -> count)."""

    path: str
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} x {r}" for r, n in self.skipped.most_common())
        return f"{self.path}: kept {self.kept}, skipped {self.num_skipped}" + (f" ({reasons})" if reasons else "")


class InvalidLine(ValueError):
    """One bad line; `reason` is short and line-independent so reports can count by it."""

    def __init__(self, path: str, line_no: int, reason: str):
        super().__init__(f"{path}:{line_no}: {reason}")
        self.reason = reason


def parse_record(obj: Any, kind: str) -> dict[str, str]:
    """Validates one decoded JSON value of `kind`; returns it with our field names."""
    if kind not in FIELDS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(FIELDS)}")
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    out = {}
    for name, spellings in FIELDS[kind].items():
        present = [s for s in spellings if s in obj]
        if not present:
            raise ValueError(f"missing field {' or '.join(repr(s) for s in spellings)}")
        if len(present) > 1:
            raise ValueError(f"both {present[0]!r} and {present[1]!r} given for {name!r}")
        value = obj[present[0]]
        if not isinstance(value, str):
            raise ValueError(f"field {present[0]!r} is {type(value).__name__}, expected a string")
        if not value.strip():
            raise ValueError(f"field {present[0]!r} is empty")
        out[name] = value
    if kind == "eval" and "answer" in obj:
        answer = obj["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"field 'answer' is {type(answer).__name__}, expected a string or number")
        out["answer"] = str(answer)
    return out


def read_jsonl(path: str | os.PathLike, kind: str, skip_invalid: bool = False
               ) -> tuple[list[dict[str, str]], ReadReport]:
    """All valid records of a JSON-lines file, in file order, and the report of what was skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{kind} file not found: {path}")
    records, report = [], ReadReport(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg})") from None
                records.append(parse_record(obj, kind))
            except ValueError as e:
                if not skip_invalid:
                    raise InvalidLine(path, line_no, str(e)) from None
                report.skipped[_reason_key(str(e))] += 1
    report.kept = len(records)
    if report.num_skipped:
        log.warning("skipped invalid lines: %s", report)
    return records, report


def _reason_key(message: str) -> str:
    """Groups messages by reason, dropping the decoder's varying details."""
    return message.split(" (")[0] if message.startswith("not valid JSON") else message
