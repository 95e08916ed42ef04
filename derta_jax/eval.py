"""Evaluate a model on the DeRTa test sets, judge saved answers again, and compare runs.

    python -m derta_jax.eval --checkpoint <model dir | training workdir> [--step N] \
        --tests demo/eval/safety_completionattack.jsonl,helpfulness_gsm8k_500.json \
        --out runs/eval/smollm2 [--max-new-tokens 1024] [--limit N] [--batch-size 16] [--chat] \
        [--dtype bfloat16] [--mesh DATA,FSDP,TENSOR] [--judge SPEC[,SPEC...]] [--kind KIND[,...]]
    python -m derta_jax.eval judge --answers runs/eval/smollm2/completionattack.jsonl[,...] \
        --judge refusal-anywhere --out runs/eval/smollm2-anywhere [--kind KIND[,...]] \
        [--tokenizer DIR] [--model NAME]
    python -m derta_jax.eval compare runs/eval/vanilla runs/eval/derta --out runs/eval/compare

Test files: JSON lines or a JSON array (the official `safety_<attack>.json`,
`helpfulness_{gsm8k_500,mmlu_500,alpaca_eval_300}.json` and any cut of them); the kind comes from
the file name (`evaluation/tasks.py`) unless --kind says it: one kind for every file, or one per
file aligned with --tests (an empty entry keeps the name's kind: `--kind ,safety`).
Judges (`evaluation/judges.py`; the first one defines ASR): `refusal` (default: the paper's rule,
harmful content before a refusal counts as harmful), `refusal-anywhere`, `refusal-first5` (each
optionally `:<phrases.txt>`), `classifier:<model dir>`, `http:<url>[#model]`. The `refusal` judge
always runs too (refusal positions, over-refusal).

Writes `<out>/<set>.jsonl` (one line per answer: question, prompt, response, num_tokens,
finish_reason, each judge's verdict, the GSM8K/MMLU score), `alpacaeval_outputs.json` for external
judging, `report.json`, `report.md` and `report.png` (every rate with n and a 95% Wilson interval).
Greedy decoding by default. Re-running the same command resumes: answers already written are
skipped. A training workdir is read at its latest step (or --step), LoRA adapters merged
(`evaluation/loading.py`, shared with generate). Batches run over every device (rows split on the
mesh's data axis). `judge` re-judges saved answers (eval's output, or any JSON lines with question
and response) without a model and writes the same files into its --out. `compare` writes
`compare.md`, `compare.json` and `compare.png`.

Every path (--checkpoint, --tests, --out, --answers, --tokenizer, compare's run dirs, a judge's
phrase file or classifier) is a local path or a bucket URL (`gs://bucket/eval/run`); resuming
into a bucket --out keeps the answers already there (`storage.append_text`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from derta_jax import cli, storage
from derta_jax.checkpoints.model_dir import load_tokenizer
from derta_jax.checkpoints.resolve import resolve_checkpoint
from derta_jax.evaluation import judges as judges_lib
from derta_jax.evaluation import loading, rejudge, report, runner, tasks

RUN_FILE = "run.json"
# Settings that change the answers: a resumed run must use the same ones.
_ANSWER_SETTINGS = ("checkpoint", "step", "chat", "max_new_tokens", "temperature", "top_p", "seed")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m derta_jax.eval", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a model dir, or a training workdir (latest step unless --step)")
    p.add_argument("--step", type=int, default=None,
                   help="training workdir step to evaluate (default: the latest)")
    p.add_argument("--tests", required=True,
                   help="comma-separated test files (JSON lines or a JSON array)")
    p.add_argument("--out", required=True, help="output directory")
    _add_kind(p, "--tests")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="first N examples of each set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template")
    _add_judge(p)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute and parameter dtype (default: as stored)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="device mesh (one size may be -1; default: every device on data)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def _add_kind(p: argparse.ArgumentParser, files_flag: str) -> None:
    p.add_argument("--kind", default=None, metavar="KIND[,KIND...]",
                   help=f"kind of every file, or one per file aligned with {files_flag} (an empty "
                        f"entry: from that file's name, e.g. 'safety,,gsm8k'); kinds: "
                        f"{', '.join(tasks.KINDS)}; default: from the file names")


def _add_judge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", action="append", default=None,
                   help="repeatable or comma-separated: refusal (default; the paper's rule), "
                        "refusal-anywhere, refusal-first5 (each optionally :<phrases.txt>), "
                        "classifier:<model dir>, http:<url>[#model]; the first one defines ASR")


def _files(text: str, flag: str) -> list[str]:
    files = [f for f in text.split(",") if f]
    if not files:
        raise ValueError(f"{flag} names no files")
    return files


def _kinds(text: str | None, files: list[str], files_flag: str = "--tests") -> list[str | None]:
    """--kind: one kind for every file, or one per file ('' = from the file name)."""
    if text is None:
        return [None] * len(files)
    kinds = [k or None for k in text.split(",")]
    if len(kinds) == 1:
        return kinds * len(files)
    if len(kinds) != len(files):
        raise ValueError(f"--kind has {len(kinds)} entries for {len(files)} {files_flag} files")
    return kinds


def _judge_specs(args: argparse.Namespace) -> list[str]:
    specs = [s for arg in (args.judge or ["refusal"]) for s in arg.split(",") if s]
    if not any(s.split(":")[0] == "refusal" for s in specs):
        specs.append("refusal")  # always: refusal positions and over-refusal need it
    return specs


def _make_judges(specs: list[str], tokenizer: Any, batch_size: int,
                 mesh: Any) -> list[judges_lib.Judge]:
    """The judges; a classifier is loaded on `mesh` as eval loads models."""
    load = lambda path: loading.load_eval_model(path, None, mesh)  # noqa: E731
    return [judges_lib.make_judge(s, tokenizer, batch_size, load_model=load) for s in specs]


def _load_run(out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """run.json of the out dir (`--out` as given); refuses to mix answers made with other
    settings."""
    path = storage.path(out) / RUN_FILE
    if not path.exists():
        return {**settings, "sets": {}}
    run = json.loads(path.read_text())
    changed = [k for k in _ANSWER_SETTINGS if run.get(k) != settings[k]]
    if changed:
        raise ValueError(f"{out} holds answers made with other settings ({', '.join(f'{k}: {run.get(k)!r} -> {settings[k]!r}' for k in changed)}); "
                         "use another --out")
    return {**run, **settings, "sets": run["sets"]}


def evaluate(argv: list[str]) -> dict[str, Any]:
    args = _parse(argv)
    files = _files(args.tests, "--tests")
    test_sets = [tasks.load_test_set(f, k, args.limit)
                 for f, k in zip(files, _kinds(args.kind, files))]
    tasks.check_distinct_sets([(ts.name, ts.path) for ts in test_sets])
    specs = _judge_specs(args)
    ckpt = resolve_checkpoint(args.checkpoint, args.step)
    settings = {"checkpoint": str(storage.path(args.checkpoint)), "step": ckpt.step,
                "chat": args.chat, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    out = storage.path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = _load_run(args.out, settings)
    mesh = loading.parse_mesh(args.mesh)
    model = loading.load_eval_model(ckpt, args.dtype, mesh)
    judges = _make_judges(specs, model.tokenizer, args.batch_size, mesh)
    options = runner.DecodeOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   chat=args.chat, temperature=args.temperature,
                                   top_p=args.top_p, seed=args.seed)
    for ts in test_sets:
        before = len(runner.read_output(runner.output_path(out, ts)))
        start = time.perf_counter()
        rows = runner.run_set(ts, model, out, judges, options, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        run["sets"][ts.name] = {"kind": ts.kind, "path": ts.path, "answered_now": len(rows) - before,
                                "seconds": round(seconds, 2)}
        if len(rows) > before:
            run["sets"][ts.name]["answers_per_minute"] = round(60 * (len(rows) - before) / seconds, 2)
        if ts.kind == tasks.ALPACAEVAL:
            runner.write_alpacaeval(out, rows, model.name)
    run["model"] = model.name
    (out / RUN_FILE).write_text(json.dumps(run, indent=2))
    return write_run_report(out, run, primary_judge=judges[0].name)


def write_run_report(out: storage.PathLike, run: dict[str, Any],
                     primary_judge: str) -> dict[str, Any]:
    """report.json/md/png from every set this out dir has answers for."""
    out = storage.path(out)
    results = {name: (s["kind"], runner.read_output(out / f"{name}.jsonl"))
               for name, s in run["sets"].items()}
    rep = report.build_report(run["model"], primary_judge, results)
    rep["throughput"] = {name: s.get("answers_per_minute") for name, s in run["sets"].items()}
    report.write_report(out, rep)
    return rep


def _parse_judge(argv: list[str]) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m derta_jax.eval judge",
        description="Judge saved answers again (no generation); writes <out>/<set>.jsonl and "
                    "report.json/md/png as eval does.")
    p.add_argument("--answers", required=True,
                   help="comma-separated answer files: eval's <out>/<set>.jsonl, or JSON lines "
                        "(or a JSON array) with question and response")
    p.add_argument("--out", required=True, help="output directory")
    _add_judge(p)
    _add_kind(p, "--answers")
    p.add_argument("--tokenizer", default=None,
                   help="model dir, workdir or tokenizer folder whose tokenizer counts refusal "
                        "positions (default: the checkpoint in run.json beside the answers)")
    p.add_argument("--model", default=None,
                   help="model name in the report (default: run.json's, else the answers' folder)")
    p.add_argument("--batch-size", type=int, default=16, help="classifier judge batch size")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="device mesh of a classifier judge (default: every device on data)")
    return p.parse_args(argv)


def judge(argv: list[str]) -> dict[str, Any]:
    """`eval judge`: the report of saved answers under the judges asked for."""
    args = _parse_judge(argv)
    files = _files(args.answers, "--answers")
    beside = storage.path(files[0]).parent / RUN_FILE
    run = json.loads(beside.read_text()) if beside.exists() else {}
    if args.tokenizer is None and "checkpoint" not in run:
        raise ValueError(f"--tokenizer is needed: no {RUN_FILE} with a checkpoint beside "
                         f"{files[0]}")
    tokenizer = load_tokenizer(loading.tokenizer_dir(args.tokenizer or run["checkpoint"]))
    mesh = loading.parse_mesh(args.mesh) if args.mesh else None
    judges = _make_judges(_judge_specs(args), tokenizer, args.batch_size, mesh)
    results = rejudge.judge_answers(files, _kinds(args.kind, files, "--answers"), judges,
                                    args.out, tokenizer)
    model = args.model or run.get("model") or storage.path(files[0]).parent.name
    sets = {name: {"kind": kind} for name, (kind, _) in results.items()}
    return write_run_report(args.out, {"model": model, "sets": sets}, judges[0].name)


def _compare(argv: list[str]) -> list[dict[str, Any]]:
    p = cli.ArgumentParser(prog="python -m derta_jax.eval compare",
                           description="Put several eval runs' reports side by side.")
    p.add_argument("runs", nargs="+", help="eval output dirs (with report.json)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return report.compare(args.runs, args.out)


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        reports = _compare(argv[1:])
        print(report.markdown(reports))
        return reports
    rep = judge(argv[1:]) if argv[:1] == ["judge"] else evaluate(argv)
    print(report.markdown([rep]))
    return rep


if __name__ == "__main__":
    cli.run_main(main)
