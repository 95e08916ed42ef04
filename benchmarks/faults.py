"""Fault injection on the tiny config: SIGKILLs at random points (during saves too) and damaged
checkpoints. Not a test: tests/training/test_faults.py runs a few kills and damage cases of it.

    python -m benchmarks.faults [--kills 20] [--steps 40] [--every 4] [--seed 0] [--out DIR]
    python -m benchmarks.faults --quick      # 3 kills over 8 steps, then the damage cases

Kills: an uninterrupted `python -m derta_jax.train` run (configs/tiny.py shrunk as the tests do,
asynchronous saves) is the reference. The same run is then started again and again in another
workdir, each process SIGKILLed either while a save is in progress (a `*.orbax-checkpoint-tmp*`
folder exists) or a random 0-1.5 s after its progress bar moved, until one finishes. Prints the
kills (how many hit a save), whether the final train state and data iterator are bit-identical to
the reference's, and whether metrics.jsonl holds exactly one row per step with the reference's
values.

Damage: the reference workdir is copied, its latest step damaged in one of DAMAGES' ways (files
deleted, truncated, zeroed, bytes flipped), and the run restored in-process as a longer run would
(stopping before its first step): prints, per case, whether it fell back to the step before (the
damaged one moved to unreadable-<step>), restored the damaged step anyway (and whether its values
equal the reference's), or stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(ROOT))

from tests.training.run_helpers import tiny_config, tiny_flags  # noqa: E402

TMP_MARK = ".orbax-checkpoint-tmp"
_BAR = re.compile(r"(\d+)/(\d+) \[")


def train_env(cache_dir: pathlib.Path | None) -> dict[str, str]:
    """The environment of a train subprocess: 8 CPU devices (as the tests), and JAX's persistent
    compilation cache in `cache_dir` so that restarts do not compile again."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               TOKENIZERS_PARALLELISM="false")
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    return env


def train_cmd(workdir: pathlib.Path, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "derta_jax.train", *flags, f"--workdir={workdir}"]


def _saving(workdir: pathlib.Path) -> bool:
    folder = workdir / "checkpoints"
    try:
        return folder.is_dir() and any(TMP_MARK in p.name for p in folder.iterdir())
    except FileNotFoundError:  # renamed under us
        return False


def _finished(workdir: pathlib.Path) -> set[str]:
    folder = workdir / "checkpoints"
    try:
        return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()
    except FileNotFoundError:
        return set()


def _bar_moves(log: pathlib.Path, first: list[int]) -> bool:
    """True once the progress bar shows a step beyond the first one it showed in this process."""
    counts = [int(m.group(1)) for m in _BAR.finditer(log.read_text(errors="replace"))]
    if counts and not first:
        first.append(counts[0])
    return bool(counts) and counts[-1] > first[0]


def kill_until_done(workdir: pathlib.Path, flags: list[str], kinds: list[str], rng: random.Random,
                    env: dict[str, str], logs: pathlib.Path, timeout: float = 900,
                    delay: tuple[float, float] = (0.0, 1.5)) -> list[str]:
    """Starts the run until a start finishes; start i is SIGKILLed as kinds[i] says ("save":
    while a save is in progress; "step": a random `delay` (s) after its first step; "after-save":
    a random `delay` after its first checkpoint is complete). Returns what happened to each start
    ("killed during a save", "killed after a step", "killed after a save", "finished")."""
    events: list[str] = []
    logs.mkdir(parents=True, exist_ok=True)
    for attempt in range(len(kinds) + 4):
        kind = kinds[attempt] if attempt < len(kinds) else None
        log = logs / f"start_{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(train_cmd(workdir, flags), cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        deadline, kill_at, first, killed = time.monotonic() + timeout, None, [], None
        saved = _finished(workdir)
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                proc.kill()
                raise RuntimeError(f"start {attempt} ran past {timeout} s; see {log}")
            if kind == "save" and _saving(workdir):
                killed = "killed during a save"
            elif kind in ("step", "after-save"):
                if kill_at is None and (_bar_moves(log, first) if kind == "step"
                                        else bool(_finished(workdir) - saved)):
                    kill_at = now + rng.uniform(*delay)
                if kill_at is not None and now >= kill_at:
                    killed = "killed after a step" if kind == "step" else "killed after a save"
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        if killed and proc.returncode == -signal.SIGKILL:
            events.append(killed)
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"start {attempt} failed (exit {proc.returncode}): "
                               f"{log.read_text()[-3000:]}")
        events.append("finished")
        return events
    raise RuntimeError(f"the run did not finish after {len(events)} starts: {events}")


def same_state(a: pathlib.Path, b: pathlib.Path, step: int) -> bool:
    """True when checkpoints/<step> of workdirs a and b hold bit-identical train states and
    data iterator states."""
    import numpy as np
    import orbax.checkpoint as ocp
    import jax
    trees = [ocp.StandardCheckpointer().restore(w / "checkpoints" / str(step) / "state")
             for w in (a, b)]
    if jax.tree.structure(trees[0]) != jax.tree.structure(trees[1]):
        return False
    equal = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), *trees))
    data = [sorted((w / "checkpoints" / str(step) / "data").glob("*.json")) for w in (a, b)]
    return all(equal) and [p.read_text() for p in data[0]] == [p.read_text() for p in data[1]]


def rows_match(reference: pathlib.Path, workdir: pathlib.Path, steps: int) -> tuple[bool, str]:
    """(every step has exactly one row with the reference's values, why not)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    got = [r["step"] for r in rows]
    if got != list(range(1, steps + 1)):
        return False, f"rows for steps {got}"
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("perf/")}  # noqa: E731
    bad = [r["step"] for r, q in zip(rows, ref) if strip(r) != strip(q)]
    return not bad, f"steps {bad} differ from the reference" if bad else ""


# Each damage takes the latest step's folder and breaks it one way.
def _largest(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _zero(path: pathlib.Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _flip(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _rm(path: pathlib.Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


DAMAGES: dict[str, Callable[[pathlib.Path], None]] = {
    "delete state/": lambda d: _rm(d / "state"),
    "delete data/": lambda d: _rm(d / "data"),
    "delete the data iterator file": lambda d: _rm(next((d / "data").glob("process_*.json"))),
    "truncate the data iterator file": lambda d: _truncate(next((d / "data").glob("process_*.json"))),
    "delete state/_METADATA": lambda d: _rm(d / "state" / "_METADATA"),
    "truncate state/_METADATA": lambda d: _truncate(d / "state" / "_METADATA"),
    "delete state/manifest.ocdbt": lambda d: _rm(d / "state" / "manifest.ocdbt"),
    "truncate state/manifest.ocdbt": lambda d: _truncate(d / "state" / "manifest.ocdbt"),
    "delete the process manifest": lambda d: _rm(d / "state" / "ocdbt.process_0" / "manifest.ocdbt"),
    "truncate the process manifest": lambda d: _truncate(
        d / "state" / "ocdbt.process_0" / "manifest.ocdbt"),
    "delete the largest tensor file": lambda d: _rm(_largest(d / "state")),
    "truncate the largest tensor file": lambda d: _truncate(_largest(d / "state")),
    "zero the largest tensor file": lambda d: _zero(_largest(d / "state")),
    "flip 64 bytes of the largest tensor file": lambda d: _flip(_largest(d / "state")),
    "delete every tensor file": lambda d: [_rm(p) for p in (d / "state").rglob("d") if p.is_dir()],
    "delete state/_sharding": lambda d: _rm(d / "state" / "_sharding"),
    "empty the step folder": lambda d: [_rm(p) for p in list(d.iterdir())],
}


@contextlib.contextmanager
def stop_before_the_first_step() -> Iterator[dict[str, Any]]:
    """Makes `loop.train` return once the run is restored (or initialised), before its first
    step (nothing to compile); yields {"start": step, "state": train state} of that run."""
    from derta_jax.training import loop
    captured: dict[str, Any] = {}
    real = loop._loop

    def restored_only(run, *args, **kwargs):
        captured.update(start=run.start, state=run.state)
        return {}

    loop._loop = restored_only
    try:
        yield captured
    finally:
        loop._loop = real


def damage_case(reference: pathlib.Path, work: pathlib.Path, name: str, latest: int,
                steps: int, **overrides) -> str:
    """Copies `reference` (a run of `tiny_config(..., **overrides)`), damages its step `latest`
    as DAMAGES[name] says and restores it in-process as a run of `steps` > latest steps would
    (stopping before the first step). Returns what happened: a fallback to the step before (the
    damaged one set aside), the damaged step restored (equal to the reference's or not), or the
    run's error."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from derta_jax.training import loop
    shutil.copytree(reference, work)
    DAMAGES[name](work / "checkpoints" / str(latest))
    printed = io.StringIO()  # what Orbax and TensorStore print besides our warning
    try:
        with stop_before_the_first_step() as run, contextlib.redirect_stderr(printed):
            loop.train(tiny_config(steps=steps, **overrides), work)
    except Exception as e:  # what a person would read
        return f"stopped: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    moved = sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.startswith("unread"))
    noise = printed.getvalue().count("Traceback")
    if run["start"] != latest:
        return (f"fell back to step {run['start']} ({', '.join(moved)} set aside"
                f"{f'; {noise} tracebacks printed' if noise else ''})")
    want = ocp.StandardCheckpointer().restore(reference / "checkpoints" / str(latest) / "state")
    got = jax.tree.leaves(jax.device_get(run["state"]))
    same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), got)]
    return ("restored the damaged step, equal to the reference (harmless damage)" if all(same)
            else "restored the damaged step with other values (damage NOT detected)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=4, help="checkpoint.every_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 kills over 8 steps")
    p.add_argument("--no-kills", action="store_true", help="only the damage cases")
    p.add_argument("--out", type=pathlib.Path, default=None, help="keep the workdirs here")
    args = p.parse_args()
    if args.quick:
        args.kills, args.steps, args.every = 3, 8, 2
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="faults_"))
    out.mkdir(parents=True, exist_ok=True)
    env = train_env(out / "jax_cache")
    overrides = dict(checkpoint__every_steps=args.every, checkpoint__async_save=True,
                     checkpoint__keep=2)
    flags = tiny_flags(args.steps, **overrides)
    reference = out / "reference"
    start = time.perf_counter()
    if not (reference / "checkpoints" / str(args.steps)).exists():
        subprocess.run(train_cmd(reference, flags), cwd=ROOT, env=env, check=True,
                       capture_output=True)
    print(f"reference: {args.steps} steps, checkpoint every {args.every}, async saves "
          f"({time.perf_counter() - start:.0f} s)")
    if not args.no_kills:
        rng = random.Random(args.seed)
        kinds = [rng.choice(["save", "step", "after-save"]) for _ in range(args.kills)]
        killed = out / "killed"
        shutil.rmtree(killed, ignore_errors=True)
        start = time.perf_counter()
        events = kill_until_done(killed, flags, kinds, rng, env, out / "logs")
        kills = [e for e in events if e.startswith("killed")]
        rows_ok, why = rows_match(reference, killed, args.steps)
        during = sum("during a save" in e for e in kills)
        print(f"kills: {len(kills)} ({during} during a save) in {len(events)} starts, "
              f"{time.perf_counter() - start:.0f} s")
        print(f"final state bit-identical to the reference: {same_state(reference, killed, args.steps)}")
        print(f"metrics.jsonl one row per step, reference values: {rows_ok} {why}")
    # The damage cases resume a copy whose latest step is damaged; its previous one is intact.
    latest, before = args.steps, args.steps - args.every
    print(f"damage to the latest step ({latest}; step {before} intact), resumed as a run of "
          f"{latest + args.every} steps:")
    fell_back = 0
    for name in DAMAGES:
        result = damage_case(reference, out / "damaged" / re.sub(r"\W+", "_", name), name, latest,
                             latest + args.every, **overrides)
        fell_back += result.startswith(f"fell back to step {before}")
        print(f"  {name}: {result}")
    print(f"{fell_back} of {len(DAMAGES)} damage cases fall back to step {before}")


if __name__ == "__main__":
    main()
