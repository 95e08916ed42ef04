"""Answering one test set: prompts -> generation -> judges and scores -> one JSON line per answer.

Resumable: `<out>/<set name>.jsonl` is appended to after every batch (`storage.append_text`: a
bucket object is rewritten whole, earlier rows and all); on a re-run the rows already there are
skipped, a half-written last line (a run killed mid-write) is cut off, and rows that
lack the verdict of a judge asked for now (or hold one made under another rule, see
`RefusalJudge.accepts`) are judged again without regenerating. `out_dir` is a local path or a
bucket URL (`gs://bucket/eval/run`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

from etils import epath
from tqdm import tqdm

from derta_jax import storage
from derta_jax.evaluation import scoring, tasks
from derta_jax.evaluation.judges import Answer, Judge

if TYPE_CHECKING:
    from derta_jax.evaluation.loading import EvalModel

GenerateFn = Callable[..., list]  # the signature of derta_jax.evaluation.generation.generate


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int = 1024  # the paper: max new tokens = block size
    batch_size: int = 16
    chat: bool = False
    temperature: float = 0.0  # greedy, as the paper
    top_p: float = 1.0
    seed: int = 0


def output_path(out_dir: str | os.PathLike, test_set: tasks.TestSet) -> epath.Path:
    return storage.path(out_dir) / f"{test_set.name}.jsonl"


def read_output(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows already written. A last line without its newline, or that does not parse, is a write
    cut short: it is removed from the file. A bad line before the last one is an error."""
    path = storage.path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(complete, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(complete) and not tail:
                complete = complete[:-1]
                break
            raise ValueError(f"{path}:{lineno}: corrupt output row; delete the file to re-run "
                             "this set") from None
    kept = b"".join(line + b"\n" for line in complete)
    if len(kept) != len(data):
        path.write_bytes(kept)
    return rows


def judges_for(kind: str, judges: Sequence[Judge]) -> list[Judge]:
    """The judges a set of this kind gets: all for safety sets, the refusal judge for
    over-refusal sets, none for the others."""
    if kind in tasks.SAFETY_KINDS:
        return list(judges)
    if kind == tasks.OVERREFUSAL:
        return [j for j in judges if j.name == "refusal"]
    return []


def score(kind: str, example: dict[str, Any], response: str) -> dict[str, Any] | None:
    """GSM8K / MMLU score of one response (None for other kinds)."""
    if kind == tasks.GSM8K:
        prediction = scoring.gsm8k_prediction(response)
        return {"prediction": None if prediction is None else str(prediction),
                "correct": scoring.gsm8k_correct(response, example["answer"])}
    if kind == tasks.MMLU:
        return {"prediction": scoring.mmlu_prediction(response),
                "correct": scoring.mmlu_correct(response, example["answer"])}
    return None


def _answer_batch(test_set, batch, model: EvalModel, options: DecodeOptions, judges, generate_fn):
    """Generates, judges and scores one batch of (index, example); returns the output rows."""
    stop = tasks.stop_ids(model.cfg, model.tokenizer)
    prompts = [tasks.build_prompt(ex["question"], test_set.kind, model.tokenizer, options.chat)
               for _, ex in batch]
    prompt_ids = [tasks.encode_prompt(p, model.tokenizer, options.chat) for p in prompts]
    outputs = generate_fn(model.params, model.cfg, prompt_ids,
                          max_new_tokens=options.max_new_tokens, stop_ids=stop,
                          batch_size=options.batch_size, temperature=options.temperature,
                          top_p=options.top_p, seed=options.seed, progress=False)
    rows = []
    for (index, example), prompt, out in zip(batch, prompts, outputs):
        ids = list(out.token_ids)  # the stop token is not part of it
        row = {"index": index, "set": test_set.name, "kind": test_set.kind,
               "question": example["question"], "prompt": prompt,
               "response": model.tokenizer.decode(ids, skip_special_tokens=True),
               "num_tokens": len(ids), "finish_reason": out.finish_reason, "judges": {}}
        if "answer" in example:
            row["answer"] = example["answer"]
        scored = score(test_set.kind, example, row["response"])
        if scored is not None:
            row["score"] = scored
        row["token_ids"] = ids
        rows.append(row)
    judge_rows(rows, judges)
    for row in rows:
        del row["token_ids"]
    return rows


def needs_verdict(row: dict[str, Any], judge: Judge) -> bool:
    """No verdict of this judge in the row yet, or one the judge no longer accepts."""
    verdict = row["judges"].get(judge.name)
    accepts = getattr(judge, "accepts", None)
    return verdict is None or (accepts is not None and not accepts(verdict))


def judge_rows(rows: list[dict[str, Any]], judges: Sequence[Judge]) -> None:
    """Adds each judge's verdict to the rows that need it (`needs_verdict`)."""
    for judge in judges:
        todo = [r for r in rows if needs_verdict(r, judge)]
        if not todo:
            continue
        answers = [Answer(r["question"], r["response"], tuple(r.get("token_ids", ()))) for r in todo]
        for row, verdict in zip(todo, judge(answers)):
            row["judges"][judge.name] = verdict


def _check_same_set(path, test_set: tasks.TestSet, rows: list[dict[str, Any]]) -> None:
    """Rows must answer the questions of this test file (rows past a smaller --limit are kept)."""
    for row in rows:
        i = row["index"]
        if i < len(test_set.examples) and test_set.examples[i]["question"] != row["question"]:
            raise ValueError(f"{path}: row {i} answers another question than example {i} of "
                             f"{test_set.path}; use a fresh --out directory")


def run_set(test_set: tasks.TestSet, model: EvalModel, out_dir: str | os.PathLike,
            judges: Sequence[Judge], options: DecodeOptions = DecodeOptions(),
            generate_fn: GenerateFn | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Answers the set's examples not yet in `<out_dir>/<name>.jsonl`; returns all its rows."""
    path = output_path(out_dir, test_set)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_output(path)
    _check_same_set(path, test_set, rows)
    set_judges = judges_for(test_set.kind, judges)
    if any(needs_verdict(r, j) for r in rows for j in set_judges):
        judge_rows(rows, set_judges)  # a judge added since the first run: no regeneration
        rewrite(path, rows)
    done = {r["index"] for r in rows}
    pending = [(i, ex) for i, ex in enumerate(test_set.examples) if i not in done]
    if pending and generate_fn is None:
        from derta_jax.evaluation.generation import generate as generate_fn
    bar = tqdm(total=len(test_set.examples), initial=len(test_set.examples) - len(pending),
               desc=test_set.name, unit="answer", disable=not progress)
    for start in range(0, len(pending), options.batch_size):
        batch = pending[start:start + options.batch_size]
        new = _answer_batch(test_set, batch, model, options, set_judges, generate_fn)
        storage.append_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
        rows.extend(new)
        bar.update(len(batch))
    bar.close()
    return sorted(rows, key=lambda r: r["index"])


def rewrite(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Replaces the output file with `rows` (never half written: `storage.write_whole`)."""
    storage.write_whole(storage.path(path),
                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_alpacaeval(out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]],
                     generator: str) -> epath.Path:
    """AlpacaEval's model-outputs file (instruction, output, generator), for external judging."""
    path = storage.path(out_dir) / "alpacaeval_outputs.json"
    records = [{"instruction": r["question"], "output": r["response"], "generator": generator}
               for r in rows]
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
