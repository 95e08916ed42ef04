"""Bad inputs a user gives the entry points, and whether each is one readable line.

    python -m benchmarks.bad_inputs [--only SUBSTRING]

Runs every entry point (`python -m derta_jax.<verb>`, as a user runs it) on each bad input of
CASES, built in a temporary folder: wrong flags and config keys, missing or malformed files
(not UTF-8, not JSON, missing fields, truncated GGUF, pickle weights), impossible meshes and
batch sizes, unknown test sets and judges. A case passes when the command exits with code 2 and
stderr holds exactly one `error: ...` line and no traceback (log lines of the run before the
error are allowed). Prints one row per case and the tally (benchmarks/README.md, issue 13).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/tiny.py", "--config.train.steps=1", "--config.data.max_length=64",
        "--config.data.helpful_count=8", "--config.data.rto_count=4",
        "--config.data.prefix_count=4"]


def _files(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """The bad files the cases point at."""
    f = {name: tmp / name for name in ("latin1.jsonl", "notjson.jsonl", "nofield.jsonl",
                                       "empty.jsonl", "trunc.gguf", "model_pickle", "badset.txt",
                                       "prompts_nofield.jsonl", "seeds_empty.txt")}
    f["latin1.jsonl"].write_bytes(b'{"query": "caf\xe9", "harmful_response": "a", '
                                  b'"safe_response": "b"}\n')
    f["notjson.jsonl"].write_text('{"query": "q", "harmful_response": "a"\n')
    f["nofield.jsonl"].write_text(json.dumps({"query": "q", "harmful_response": "a"}) + "\n")
    f["empty.jsonl"].write_text("")
    f["trunc.gguf"].write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    f["model_pickle"].mkdir()
    (f["model_pickle"] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (f["model_pickle"] / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    f["badset.txt"].write_text("question\n")
    f["prompts_nofield.jsonl"].write_text(json.dumps({"text": "hi"}) + "\n")
    f["seeds_empty.txt"].write_text("\n\n")
    return f


def cases(tmp: pathlib.Path) -> list[tuple[str, str, list[str]]]:
    """(name, module, args) of every bad input."""
    f = _files(tmp)
    w = str(tmp / "work")
    train = "derta_jax.train"
    return [
        ("train: unknown config key", train, [*TINY, "--config.train.stepz=1", f"--workdir={w}1"]),
        ("train: bad config value", train, [*TINY, "--config.data.recipe=dpo", f"--workdir={w}2"]),
        ("train: bad value type", train, [*TINY, "--config.train.batch_size=many", f"--workdir={w}3"]),
        ("train: missing config file", train, ["--config=configs/nope.py", f"--workdir={w}4"]),
        ("train: missing data file", train, [*TINY, f"--config.data.safety={tmp}/none.jsonl",
                                             f"--workdir={w}5"]),
        ("train: data file not UTF-8", train, [*TINY, f"--config.data.safety={f['latin1.jsonl']}",
                                               f"--workdir={w}6"]),
        ("train: data line not JSON", train, [*TINY, f"--config.data.safety={f['notjson.jsonl']}",
                                              f"--workdir={w}7"]),
        ("train: data row missing a field", train,
         [*TINY, f"--config.data.safety={f['nofield.jsonl']}", f"--workdir={w}8"]),
        ("train: empty data file", train, [*TINY, f"--config.data.safety={f['empty.jsonl']}",
                                           f"--workdir={w}9"]),
        ("train: count above the data", train, [*TINY, "--config.data.rto_count=100000",
                                                f"--workdir={w}10"]),
        ("train: batch not divisible by the mesh", train,
         [*TINY, "--config.train.batch_size=3", "--config.mesh.data=2", f"--workdir={w}11"]),
        ("train: mesh larger than the devices", train, [*TINY, "--config.mesh.data=64",
                                                        f"--workdir={w}12"]),
        ("train: bad column mapping", train, [*TINY, "--config.data.safety_columns=query",
                                              f"--workdir={w}13"]),
        ("train: missing model checkpoint", train,
         [*TINY, "--config.model.init=checkpoint", f"--config.model.checkpoint={tmp}/nomodel",
          f"--workdir={w}14"]),
        ("convert: missing --hf folder", "derta_jax.convert", ["--hf", f"{tmp}/none", "--out",
                                                              f"{tmp}/o1"]),
        ("convert: pickle weights, no tokenizer", "derta_jax.convert",
         ["--hf", str(f["model_pickle"]), "--out", f"{tmp}/o2"]),
        ("convert: truncated GGUF", "derta_jax.convert", ["--gguf", str(f["trunc.gguf"]), "--out",
                                                         f"{tmp}/o3"]),
        ("convert: bad dtype", "derta_jax.convert", ["--hf", "x", "--out", "y", "--dtype", "fp8"]),
        ("export: missing checkpoint", "derta_jax.export", ["--checkpoint", f"{tmp}/none",
                                                           "--out", f"{tmp}/o4"]),
        ("export: bad step", "derta_jax.export", ["--checkpoint", "x", "--out", "y", "--step",
                                                 "last"]),
        ("eval: missing checkpoint", "derta_jax.eval",
         ["--checkpoint", f"{tmp}/none", "--tests", "derta_jax/data/demo/eval/"
          "safety_completionattack.jsonl", "--out", f"{tmp}/o5"]),
        ("eval: test set of unknown kind", "derta_jax.eval",
         ["--checkpoint", f"{tmp}/none", "--tests", str(f["badset.txt"]), "--out", f"{tmp}/o6"]),
        ("eval: unknown judge", "derta_jax.eval",
         ["--checkpoint", f"{tmp}/none", "--tests", "derta_jax/data/demo/eval/"
          "safety_completionattack.jsonl", "--judge", "gpt", "--out", f"{tmp}/o7"]),
        ("eval: bad mesh, missing checkpoint", "derta_jax.eval",
         ["--checkpoint", f"{tmp}/none", "--tests", "derta_jax/data/demo/eval/"
          "safety_completionattack.jsonl", "--mesh", "2,2", "--out", f"{tmp}/o8"]),
        ("eval judge: missing answers, no tokenizer", "derta_jax.eval",
         ["judge", "--answers", f"{tmp}/none.jsonl", "--out", f"{tmp}/o9"]),
        ("generate: prompts without a prompt field", "derta_jax.generate",
         ["--checkpoint", f"{tmp}/none", "--prompts", str(f["prompts_nofield.jsonl"]),
          "--out", f"{tmp}/o10", "--max-new-tokens", "4"]),
        ("data.build: missing safety file", "derta_jax.data.build",
         ["--recipe", "derta", "--safety", f"{tmp}/none.jsonl", "--helpful", "demo", "--out",
          f"{tmp}/o11.jsonl"]),
        ("data.build: unknown recipe", "derta_jax.data.build",
         ["--recipe", "dpo", "--safety", "demo", "--helpful", "demo", "--out", f"{tmp}/o12"]),
        ("data.build: line not JSON", "derta_jax.data.build",
         ["--recipe", "derta", "--safety", str(f["notjson.jsonl"]), "--helpful", "demo",
          "--out", f"{tmp}/o13.jsonl"]),
        ("selfgen: missing checkpoint", "derta_jax.data.selfgen",
         ["--checkpoint", f"{tmp}/none", "--n", "2", "--out", f"{tmp}/o14.jsonl"]),
        ("selfgen: empty seeds file", "derta_jax.data.selfgen",
         ["--checkpoint", f"{tmp}/none", "--n", "2", "--out", f"{tmp}/o15.jsonl", "--seeds",
          str(f["seeds_empty.txt"])]),
    ]


def verdict(proc: subprocess.CompletedProcess) -> tuple[bool, str]:
    """(one readable line with exit 2, that line or what went wrong)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    if proc.returncode != 2 or len(errors) != 1 or "Traceback" in proc.stderr:
        tail = " | ".join(proc.stderr.strip().splitlines()[-2:])[:200]
        return False, f"rc {proc.returncode}, {len(errors)} error lines: {tail}"
    return True, errors[0][:160]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="run the cases whose name holds this")
    args = p.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),  # 8 devices, as tests
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    passed = 0
    with tempfile.TemporaryDirectory() as tmp:
        todo = [c for c in cases(pathlib.Path(tmp)) if args.only in c[0]]
        start = time.perf_counter()
        for name, module, argv in todo:
            proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            ok, text = verdict(proc)
            passed += ok
            print(f"{'ok ' if ok else 'BAD'} {name}: {text}", flush=True)
    print(f"{passed} of {len(todo)} bad inputs gave one error line and exit code 2 "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
