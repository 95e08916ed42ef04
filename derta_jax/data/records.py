"""Input rows (JSON lines or Hugging Face `datasets`), validated row by row.

Three kinds of rows:

- `safety`: triples `{query, harmful_response, safe_response}`; the official BeaverTails-derived
  release writes them as `{instruction, output, safe_response}`, accepted too.
- `helpful`: pairs `{instruction, output}` (the official WizardLM-uncensored files), optionally
  with `rejected`, a worse answer to the same instruction (preference pairs).
- `eval`: `{question}` with an optional `answer` (string or number, kept as a string).

Safety and helpful rows can instead be multi-turn chats: `messages`, a list of `{role, content}`
(roles system, user, assistant). A helpful chat ends with the assistant turn it trains; a safety
chat ends with the harmful user turn and keeps `harmful_response` and `safe_response` (the two
versions of the last assistant turn). Such rows come back as `{messages, output}` (helpful: the
last assistant content, the messages before it) or `{messages, harmful_response, safe_response}`,
plus `id` (file:line or dataset row) for the errors of the chat template that renders them.

A `Source` is a JSON-lines file (read here, line by line), a parquet, arrow or JSON file (`.json`:
lines or one array), a dataset folder (`save_to_disk`, or a folder of data files) or a Hugging
Face hub name with a split and revision; all but the first are read with the `datasets` library,
imported only then. Several sources separated by commas (`demo.jsonl,selfgen.jsonl`) are read in
turn as one. `Source.columns` maps our fields to the dataset's columns
(`"query=prompt,safe_response=chosen"`); unmapped fields take their usual spellings.

A bad row (not UTF-8, not JSON, not an object, a missing, empty or non-string field, both
spellings of one field) raises `ValueError` naming the file or dataset, the line (JSON lines) or
row index (`dataset[i]`) and the reason. With `skip_invalid=True` it is skipped instead and
counted by reason in the returned `ReadReport`, which is also logged. Blank lines are ignored.
Extra keys are ignored. A dataset with no column for a field is an error naming the field, the
column(s) looked for and the columns it has.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Iterator

from derta_jax import storage

log = logging.getLogger(__name__)

# kind -> {our field: accepted spellings, in order}
FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "safety": {"query": ("query", "instruction"), "harmful_response": ("harmful_response", "output"),
               "safe_response": ("safe_response",)},
    "helpful": {"instruction": ("instruction",), "output": ("output",)},
    "eval": {"question": ("question",)},
}
# kind -> {optional field: accepted spellings}: kept when present (null counts as absent)
OPTIONAL: dict[str, dict[str, tuple[str, ...]]] = {
    "helpful": {"rejected": ("rejected",)},  # a worse answer: preference pairs (recipe=preference)
}
ROLES = ("system", "user", "assistant")
# kind -> the fields a multi-turn row has besides `messages` (read as FIELDS spells them)
CHAT_FIELDS = {"safety": ("harmful_response", "safe_response"), "helpful": ()}
# file suffix -> the `datasets` builder that reads it; any other file is JSON lines, read here
DATASET_FILES = {".parquet": "parquet", ".arrow": "arrow", ".json": "json"}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one kind of rows comes from (see the module docstring)."""

    path: str  # JSON-lines file | parquet/arrow/json file | dataset folder | hub name
    split: str = "train"  # dataset folders with splits and hub names only
    revision: str = ""  # hub names only: a branch, tag or commit; '' = the default branch
    columns: str = ""  # "field=column,..." (our field -> the dataset's column); '' = none

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))

    def parts(self) -> list[str]:
        """The sources a comma-separated path names, in order."""
        return [p.strip() for p in self.path.split(",") if p.strip()]


def parse_columns(spec: str, kind: str) -> dict[str, str]:
    """`"field=column,..."` -> {field: column}; every field must be one of `kind`'s."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        field, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not field or not column:
            raise ValueError(f"{item!r} is not field=column")
        known = [*FIELDS[kind], *OPTIONAL.get(kind, {}),
                 *(["messages"] if kind in CHAT_FIELDS else [])]
        if field not in known:
            raise ValueError(f"{field!r} is not a {kind} field ({', '.join(known)})")
        if field in out:
            raise ValueError(f"{field!r} is mapped twice")
        out[field] = column
    return out


@dataclasses.dataclass
class ReadReport:
    """What reading one source kept and skipped (skipped: reason -> count)."""

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
    """One bad row; `reason` is short and row-independent so reports can count by it."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def parse_record(obj: Any, kind: str, columns: dict[str, str] | None = None) -> dict[str, Any]:
    """Validates one decoded row of `kind`; returns it with our field names.

    `columns`: {field: the one key to read it from}, replacing the field's usual spellings.
    """
    if kind not in FIELDS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(FIELDS)}")
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    chat = _is_chat(kind, columns, obj)
    out: dict[str, Any] = {}
    for name, spellings in _spellings(kind, columns, chat).items():
        if name == "messages":
            out.update(_chat(obj[spellings[0]], kind))
            continue
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
    for name, spellings in OPTIONAL.get(kind, {}).items():
        key = (columns or {}).get(name, spellings[0])
        if obj.get(key) is None:
            continue
        value = obj[key]
        if not isinstance(value, str):
            raise ValueError(f"field {key!r} is {type(value).__name__}, expected a string")
        if not value.strip():
            raise ValueError(f"field {key!r} is empty")
        out[name] = value
    if kind == "eval" and "answer" in obj:
        answer = obj["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"field 'answer' is {type(answer).__name__}, expected a string or number")
        out["answer"] = str(answer)
    return out


def _messages_key(columns: dict[str, str] | None) -> str:
    return (columns or {}).get("messages", "messages")


def _is_chat(kind: str, columns: dict[str, str] | None, row: Any) -> bool:
    """A multi-turn row: its kind has them and its messages key holds a value (not null)."""
    return kind in CHAT_FIELDS and row.get(_messages_key(columns)) is not None


def _spellings(kind: str, columns: dict[str, str] | None, chat: bool = False
               ) -> dict[str, tuple[str, ...]]:
    """{field: the keys it may be read from} of a flat or multi-turn row of `kind`."""
    columns = columns or {}
    fields = FIELDS[kind]
    if chat:
        fields = {"messages": ("messages",), **{f: fields[f] for f in CHAT_FIELDS[kind]}}
    return {name: (columns[name],) if name in columns else spellings
            for name, spellings in fields.items()}


def _chat(messages: Any, kind: str) -> dict[str, Any]:
    """A validated `messages` list as a row's chat fields (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field 'messages' is {type(messages).__name__}, expected a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is not {{role: {' | '.join(ROLES)}, content: string}}")
        if m["role"] != "system" and not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}) is empty")
        out.append({"role": m["role"], "content": m["content"]})
    ends = ("user", "assistant") if kind == "helpful" else ("user",)
    if [m["role"] for m in out[-len(ends):]] != list(ends):
        raise ValueError(f"a {kind} chat ends with {' then '.join(ends)} turns"
                         + (" (harmful_response, safe_response answer it)" if kind == "safety" else ""))
    if kind == "helpful":
        return {"messages": out[:-1], "output": out[-1]["content"]}
    return {"messages": out}


def read_rows(source: Source | str | os.PathLike, kind: str, skip_invalid: bool = False
              ) -> tuple[list[dict[str, Any]], ReadReport]:
    """All valid rows of a source, in its order, and the report of what was skipped. A path
    with commas is several sources read in turn (same split, revision and columns)."""
    if not isinstance(source, Source):
        source = Source(source)
    parts = source.parts()
    if len(parts) > 1:
        rows, report = [], ReadReport(source.path)
        for part in parts:
            more, one = read_rows(dataclasses.replace(source, path=part), kind, skip_invalid)
            rows += more
            report.kept += one.kept
            report.skipped.update(one.skipped)
        return rows, report
    columns = parse_columns(source.columns, kind)
    if _is_json_lines(source.path):
        return _validate(_json_lines(source.path, kind), source.path, kind, columns, skip_invalid)
    dataset = load_dataset(source, kind)
    _check_columns(dataset.column_names, source.path, kind, columns)
    return _validate(((f"{source.path}: row {i}", row) for i, row in enumerate(dataset)),
                     source.path, kind, columns, skip_invalid)


def read_jsonl(path: str | os.PathLike, kind: str, skip_invalid: bool = False
               ) -> tuple[list[dict[str, str]], ReadReport]:
    """All valid records of a JSON-lines file, in file order, and the report of what was skipped."""
    path = os.fspath(path)
    return _validate(_json_lines(path, kind), path, kind, None, skip_invalid)


def _is_json_lines(path: str) -> bool:
    """A local path that is not a dataset (a hub name or a dataset file or folder): JSON lines.

    A path that looks local (a separator or a known suffix) but does not exist is too, so that a
    typo reads "file not found" rather than a hub lookup. A bucket URL is a file or folder too."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in DATASET_FILES or storage.path(path).is_dir():
        return False
    return storage.is_url(path) or os.path.isfile(path) or suffix == ".jsonl" or \
        path.startswith((os.sep, ".", "~"))


def _json_lines(path: str, kind: str) -> Iterator[tuple[str, Any]]:
    """(where, decoded value or the ValueError that stops it) of each non-blank line."""
    file = storage.path(path)
    if not file.is_file():
        raise ValueError(f"{kind} file not found: {path}")
    with file.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"not valid JSON ({e.msg})")


def _validate(rows: Iterable[tuple[str, Any]], path: str, kind: str, columns: dict[str, str] | None,
              skip_invalid: bool) -> tuple[list[dict[str, Any]], ReadReport]:
    records, report = [], ReadReport(path)
    for where, obj in rows:
        try:
            if isinstance(obj, ValueError):
                raise obj
            record = parse_record(obj, kind, columns)
            if "messages" in record:
                record["id"] = where
            records.append(record)
        except ValueError as e:
            if not skip_invalid:
                raise InvalidLine(where, str(e)) from None
            report.skipped[_reason_key(str(e))] += 1
    report.kept = len(records)
    if report.num_skipped:
        log.warning("skipped invalid rows: %s", report)
    return records, report


def load_dataset(source: Source, kind: str) -> Any:
    """The `datasets.Dataset` of a dataset file, folder or hub name; its errors as one ValueError."""
    import datasets  # only for sources that are not JSON lines

    path, suffix = source.path, os.path.splitext(source.path)[1].lower()
    try:
        if storage.is_url(path):  # datasets reads local files: a downloaded copy
            path = str(storage.local_copy(path))
        if os.path.isfile(path):
            dataset = datasets.load_dataset(DATASET_FILES[suffix], data_files=path, split="train")
        elif os.path.isdir(path) and _is_saved(path):
            dataset = datasets.load_from_disk(path)
        else:
            dataset = datasets.load_dataset(path, split=source.split, revision=source.revision or None)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        where = f"split {source.split!r}" + (f", revision {source.revision!r}" if source.revision else "")
        raise ValueError(f"{kind} dataset {source.path!r} ({where}) could not be loaded: {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if source.split not in dataset:
            raise ValueError(f"{kind} dataset {source.path!r} has no split {source.split!r} "
                             f"(splits: {', '.join(dataset)})")
        dataset = dataset[source.split]
    return dataset


def _is_saved(folder: str) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json"))


def _check_columns(names: list[str], path: str, kind: str, columns: dict[str, str]) -> None:
    chat = kind in CHAT_FIELDS and _messages_key(columns) in names
    for name, spellings in _spellings(kind, columns, chat).items():
        if not any(s in names for s in spellings):
            looked = " or ".join(repr(s) for s in spellings)
            raise ValueError(f"{kind} dataset {path!r} has no column {looked} for {name!r} "
                             f"(columns: {', '.join(names)}); map one with data.{kind}_columns")


def _reason_key(message: str) -> str:
    """Groups messages by reason, dropping the decoder's varying details."""
    return message.split(" (")[0] if message.startswith(("not valid JSON", "not valid UTF-8")) else message
