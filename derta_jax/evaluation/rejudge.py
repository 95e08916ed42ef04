"""Judging saved answers again without regenerating (`python -m derta_jax.eval judge`).

An answers file is eval's own output (`<out>/<set name>.jsonl`) or any JSON lines (or one JSON
array) with a `question` and a `response` per answer. Its set name is the rows' `set` field, else
the file name (`tasks.set_name`); its kind is `--kind`, else the rows' `kind` field, else the file
name (`tasks.answers_kind`: a test file's name or eval's output name, e.g. `pair.jsonl`).

Rows get what eval's rows have: `index`, `set`, `kind`, `judges`, and `num_tokens` (the
response's token count when missing); GSM8K / MMLU rows are scored again from their `answer`.
The verdicts of the judges asked for are made anew (other judges' verdicts are kept) and the rows
go to `<out>/<set name>.jsonl`, so the out dir reads like eval's (report, `eval compare`).
Answers files and the out dir are local paths or bucket URLs.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from derta_jax import storage
from derta_jax.evaluation import runner, tasks
from derta_jax.evaluation.judges import Judge


def read_answers(path: str | os.PathLike, kind: str | None = None
                 ) -> tuple[str, str, list[dict[str, Any]]]:
    """(set name, kind, rows) of one answers file."""
    rows = tasks.read_jsonl(path, ("question", "response"))
    if not rows:
        raise ValueError(f"{path}: no answers")
    if kind is not None:
        kind = tasks.infer_kind(path, kind)
    else:
        kind = _kind_of_rows(path, rows) or tasks.answers_kind(path)
    return rows[0].get("set") or tasks.set_name(path), kind, rows


def _kind_of_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> str | None:
    kinds = {r.get("kind") for r in rows}
    if kinds == {None}:
        return None
    if len(kinds) > 1 or not kinds <= set(tasks.KINDS):
        raise ValueError(f"{path}: rows of kinds {sorted(map(str, kinds))}; pass --kind")
    return kinds.pop()


def prepare(path: str | os.PathLike, name: str, kind: str, rows: Sequence[dict[str, Any]],
            tokenizer: Any) -> list[dict[str, Any]]:
    """Rows in eval's shape (see the module docstring), GSM8K / MMLU scored again."""
    out = []
    for i, row in enumerate(rows):
        row = {"index": i, **row, "set": name, "kind": kind,
               "judges": dict(row.get("judges") or {})}
        if "num_tokens" not in row:
            ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            row["num_tokens"] = len(ids)
        if kind in (tasks.GSM8K, tasks.MMLU):
            if not isinstance(row.get("answer"), str):
                raise ValueError(f"{path}: answer {i} has no string 'answer' to score {kind} with")
            row["score"] = runner.score(kind, row, row["response"])
        out.append(row)
    return out


def judge_answers(files: Sequence[str | os.PathLike], kinds: Sequence[str | None],
                  judges: Sequence[Judge], out: str | os.PathLike, tokenizer: Any
                  ) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Judges every answers file again and writes `<out>/<set name>.jsonl`; returns
    set name -> (kind, rows). All files are read before any is written."""
    read = [(path, *read_answers(path, kind)) for path, kind in zip(files, kinds)]
    tasks.check_distinct_sets([(name, path) for path, name, _, _ in read])
    out = storage.path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path, name, kind, rows in read:
        rows = prepare(path, name, kind, rows, tokenizer)
        set_judges = runner.judges_for(kind, judges)
        for row in rows:
            for judge in set_judges:
                row["judges"].pop(judge.name, None)
        runner.judge_rows(rows, set_judges)
        runner.rewrite(out / f"{name}.jsonl", rows)
        results[name] = (kind, rows)
    return results
