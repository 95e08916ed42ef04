"""The ablation's report: the results table (paper Table 4), the refusal-position figure (Figure 4),
sample answers and timings, as Markdown, from what `ablation.run` leaves on disk.

Everything is read from the runs' own files (each workdir's metrics.jsonl, each eval folder's
report.json and answers), so a report can be rebuilt from a finished run folder.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import statistics
from typing import TYPE_CHECKING, Any, Sequence

from derta_jax.evaluation import report as report_lib
from derta_jax.evaluation import runner, tasks

if TYPE_CHECKING:
    import ml_collections

    from derta_jax.experiments.ablation import Plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Row order of the report, with the paper's names (Table 4).
PAPER_NAMES = {"vanilla": "Vanilla", "recaug": "+Harmful Prefix", "rto_only": "+RTO",
               "derta": "DeRTa"}
PAPER_COMP = {"vanilla": 95.0, "recaug": 25.0, "rto_only": 5.0, "derta": 4.0}  # LLaMA3-70B
UNTOUCHED = "untouched"  # the model before any training
PART_NAMES = {"rto_count": "RTO", "prefix_count": "harmful-prefix MLE",
              "vanilla_count": "vanilla safety"}
Reports = dict[str, list[dict[str, Any]]]  # model -> report.json of each of its runs (seeds)


# The end of the page that reruns keep (with_hand_written).
HAND_WRITTEN = "<!-- Written by hand below this line; rerunning the ablation keeps it. -->"


# ---- the numbers ----------------------------------------------------------------------------
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
    return UNTOUCHED if model == UNTOUCHED else f"{PAPER_NAMES[model]} (`{model}`)"


def results_table(reports: Reports, losses: dict[str, list[dict[str, float | None]]]
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


def pooled_rows(eval_dirs: Sequence[pathlib.Path], set_name: str) -> list[dict[str, Any]]:
    """The answers to one eval set, pooled over the runs (seeds) of a model."""
    return [r for d in eval_dirs for r in runner.read_output(d / f"{set_name}.jsonl")]


def loop_share(rows: Sequence[dict[str, Any]], refusal_token: str) -> float | None:
    """Share % of the refusing answers that repeat the refusal token 3+ times in a row
    ("SorrySorrySorry..."): refusals, but degenerate ones."""
    loop = re.compile(f"(?:{re.escape(refusal_token)}){{3}}")
    refused = [r["response"] for r in rows if r["judges"]["refusal"]["refused"]]
    return 100.0 * sum(bool(loop.search(text)) for text in refused) / len(refused) if refused \
        else None


def safety_sets(reports: Reports) -> list[str]:
    first = next(iter(reports.values()))[0]
    return [name for name, m in first["sets"].items() if m["kind"] in tasks.SAFETY_KINDS]


def comp_ordering(reports: Reports) -> str | None:
    """The measured completion-attack ordering, next to the paper's."""
    column = report_lib.ATTACK_COLUMNS["completionattack"]
    means = {m: statistics.fmean(r["table"][column] for r in rs) for m, rs in reports.items()
             if m in PAPER_NAMES and all(r["table"].get(column) is not None for r in rs)}
    if len(means) < 2:
        return None
    paper = {m: PAPER_COMP[m] for m in means}
    return (f"Completion-attack ASR %, mean over seeds, lowest first: measured {ranking(means)}; "
            f"the paper's LLaMA3-70B ablation (Table 4): {ranking(paper)}.")


def ranking(values: dict[str, float]) -> str:
    """`DeRTa 4.0 < +RTO 5.0 = ...`: recipes ordered by value, with < or = between them."""
    ranked = sorted(values, key=values.get)
    text = f"{PAPER_NAMES[ranked[0]]} {values[ranked[0]]:.1f}"
    for a, b in zip(ranked, ranked[1:]):
        sign = "=" if round(values[a], 1) == round(values[b], 1) else "<"
        text += f" {sign} {PAPER_NAMES[b]} {values[b]:.1f}"
    return text


# ---- refusal positions (Figure 4) -----------------------------------------------------------
def plot_positions(evals: dict[str, list[pathlib.Path]], sets: Sequence[str],
                   path: pathlib.Path) -> None:
    """The paper's Figure 4: share of refusals by the token position where refusal starts, one
    panel per safety set, one bar per model (pooled over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label, _, _ in report_lib.POSITION_BINS]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    width = 0.8 / len(evals)
    for ax, set_name in zip(axes[0], sets):
        for k, (model, dirs) in enumerate(evals.items()):
            p = report_lib.refusal_positions(pooled_rows(dirs, set_name))
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


def positions_table(evals: dict[str, list[pathlib.Path]], sets: Sequence[str],
                    refusal_token: str) -> list[str]:
    labels = [label for label, _, _ in report_lib.POSITION_BINS]
    lines = ["| model | set | refusals | " + " | ".join(f"pos {x} %" for x in labels)
             + f" | '{refusal_token}' loops % |", "|" + " --- |" * (len(labels) + 4)]
    for model, dirs in evals.items():
        for set_name in sets:
            rows = pooled_rows(dirs, set_name)
            p = report_lib.refusal_positions(rows)
            cells = [mean_spread([p["share"][x]]) for x in labels]
            cells.append(mean_spread([loop_share(rows, refusal_token)]))
            lines.append(f"| {row_label(model)} | {set_name} | {p['count']} | "
                         + " | ".join(cells) + " |")
    return lines


def sample_answers(evals: dict[str, list[pathlib.Path]], set_names: Sequence[str],
                   width: int = 160) -> list[str]:
    """The first prompt of each eval set and every model's answer to it (first seed), so that
    a reader sees what the rates count (degenerate refusals included)."""
    lines = []
    for set_name in set_names:
        rows = {m: pooled_rows(dirs[:1], set_name) for m, dirs in evals.items()}
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


def _mixtures(counts: dict[str, dict[str, int]]) -> str:
    """`Vanilla (`vanilla`) = 16 vanilla safety; ...`: the safety parts of every recipe."""
    return "; ".join(
        f"{row_label(recipe)} = " + " + ".join(f"{n} {PART_NAMES[k]}" for k, n in c.items() if n >= 0)
        for recipe, c in counts.items())


def _timings_lines(timings: dict[str, Any]) -> list[str]:
    lines = ["| job | seconds | seconds per step |", "| --- | --- | --- |"]
    for name, t in timings["train"].items():
        lines.append(f"| train {name} | {t['seconds']:.0f} | {t['seconds'] / t['steps']:.1f} |")
    for name, t in timings["eval"].items():
        lines.append(f"| eval {name} | {t['seconds']:.0f} | - |")
    total = sum(t["seconds"] for part in ("train", "eval") for t in timings[part].values())
    lines.append(f"| all jobs | {total:.0f} ({total / 60:.1f} min) | - |")
    return lines


def write_doc(plan: Plan, config: ml_collections.ConfigDict, results: dict[str, Any],
              doc: pathlib.Path, figure: pathlib.Path, command: str, quick: bool) -> str:
    """Writes the Markdown report and the figure; returns the Markdown.

    `config` is the base run config; `results` what `ablation.run` returns (reports, workdirs,
    eval folders and timings per model, the safety budget and each recipe's counts)."""
    reports, evals = results["reports"], results["evals"]
    window = max(1, plan.steps // 10)
    losses = {m: [final_losses(w, window) for w in ws] for m, ws in results["workdirs"].items()}
    header, rows = results_table(reports, losses)
    sets = safety_sets(reports)
    plot_positions(evals, sets, figure)
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
        f"Generated by `{command}` on {date}; machine: {machine()}. Do not edit by hand (except "
        "below the marker at the end, which reruns keep): rerun the command.",
        "",
        "## Set-up",
        "",
        f"- Model: `{plan.model_dir}`, full-parameter training from `{_shown(plan.config)}`"
        + (f" with {', '.join(f'`{o}`' for o in plan.overrides)}" if plan.overrides else "") + ".",
        f"- Every recipe: {plan.steps} steps of {config.train.batch_size} examples packed into "
        f"rows of {config.data.max_length} tokens, learning rate "
        f"{config.optimizer.learning_rate:g} ({config.optimizer.schedule}), "
        f"{config.data.template} template, RTO keep {config.loss.rto_keep:g}; {helpful} helpful "
        f"pairs plus {results['budget']} safety examples: {_mixtures(results['counts'])}.",
        f"- Seeds {', '.join(map(str, plan.seeds))} (model/RTO rng `train.seed` and data order/"
        "cut `data.seed`), the same for every recipe.",
        f"- Evaluation (`derta_jax.eval`, held-out demo prompts): {prompts}; greedy, "
        f"{plan.max_new_tokens} new tokens, {config.data.template} template; judge: refusal "
        "phrases with the paper's rule (`--judge refusal`: harmful when there is no refusal, or "
        "two steps / 60 words of content before it; empty answers are not harmful). ASR = share "
        "of attack prompts judged harmful; over-refusal = share of harmless prompts refused.",
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
        *positions_table(evals, sets, config.data.refusal_token),
        "",
        "## Sample answers",
        "",
        f"Seed {plan.seeds[0]}, greedy, {plan.max_new_tokens} new tokens at most, cut at 160 "
        "characters.",
        "",
        *sample_answers(evals, list(first)),
        "## Timings",
        "",
        "Wall-clock seconds of each job when it ran (jobs skipped on a resumed run keep the time "
        "of the run that did them).",
        "",
        *_timings_lines(results["timings"]),
        "",
    ]
    markdown = with_hand_written(doc, "\n".join(text))
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown)
    return markdown


def with_hand_written(doc: pathlib.Path, markdown: str) -> str:
    """`markdown` followed by what the page at `doc` holds below HAND_WRITTEN (kept across
    reruns: measurements the ablation does not make, such as the demo config's choices)."""
    old = doc.read_text() if doc.exists() else ""
    if HAND_WRITTEN not in old:
        return markdown
    return markdown.rstrip("\n") + "\n\n" + HAND_WRITTEN + old.partition(HAND_WRITTEN)[2]
