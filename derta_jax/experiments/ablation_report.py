"""The ablation's report: the results table (paper Table 4, with the DPO baseline and Qi et al.'s
constrained SFT beside the four recipes), the refusal-position figure (Figure 4),
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
# The rows' names: the paper's (Table 4; its DPO baseline, Figure 5) and Qi et al.'s method.
PAPER_NAMES = {"vanilla": "Vanilla", "recaug": "+Harmful Prefix", "rto_only": "+RTO",
               "derta": "DeRTa", "dpo": "Vanilla + DPO",
               "constrained": "Constrained SFT (Qi et al.)"}
PAPER_COMP = {"vanilla": 95.0, "recaug": 25.0, "rto_only": 5.0, "derta": 4.0}  # LLaMA3-70B
UNTOUCHED = "untouched"  # the model before any training
PART_NAMES = {"rto_count": "RTO", "prefix_count": "harmful-prefix MLE",
              "vanilla_count": "vanilla safety"}
LOSS_COLUMNS = ("loss/mle", "loss/rto")  # always shown; other loss/* keys when a row has them
Reports = dict[str, list[dict[str, Any]]]  # model -> report.json of each of its runs (seeds)


# The end of the page that reruns keep (with_hand_written).
HAND_WRITTEN = "<!-- Written by hand below this line; rerunning the ablation keeps it. -->"


# ---- the numbers ----------------------------------------------------------------------------
def final_losses(workdir: pathlib.Path, window: int) -> dict[str, float | None]:
    """Mean of every loss/* metric over the last `window` logged steps that have it: loss/mle,
    loss/rto (only steps with RTO tokens), loss/dpo or loss/constrained_sft; None for one of
    LOSS_COLUMNS that the run does not log (loss/rto of a recipe without RTO tokens)."""
    path = workdir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} has no metrics")
    last = lines[-window:]
    keys = dict.fromkeys([*LOSS_COLUMNS, *(k for m in last for k in m if k.startswith("loss/"))])
    out: dict[str, float | None] = {}
    for key in keys:
        values = [m[key] for m in last if key in m and
                  (key != "loss/rto" or m.get("tokens/rto", 0) > 0)]
        out[key] = statistics.fmean(values) if values else None
    return out


def run_window(workdir: pathlib.Path) -> int:
    """How many last logged steps `final_losses` averages: a tenth of the run's steps (>= 1)."""
    return max(1, run_config(workdir)["train"]["steps"] // 10)


def run_config(workdir: pathlib.Path) -> dict[str, Any]:
    """The config a training workdir ran with (its config.json)."""
    return json.loads((workdir / "config.json").read_text())


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
    loss_columns = list(dict.fromkeys([*LOSS_COLUMNS,
                                       *(k for ls in losses.values() for l in ls for k in l)]))
    header = ["model"] + [f"{c} %" if report_lib.is_overrefusal_column(c) else f"{c} ASR %"
                          for c in columns] + loss_columns
    rows = []
    for model, rs in reports.items():
        cells = [mean_spread([r["table"].get(c) for r in rs]) for c in columns]
        run_losses = losses.get(model, [])
        cells += [mean_spread([losses_.get(k) for losses_ in run_losses], digits=2)
                  for k in loss_columns]
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
    """The measured completion-attack ordering, next to the paper's (its Table 4 rows)."""
    column = report_lib.ATTACK_COLUMNS["completionattack"]
    means = {m: statistics.fmean(r["table"][column] for r in rs) for m, rs in reports.items()
             if m in PAPER_NAMES and all(r["table"].get(column) is not None for r in rs)}
    if len(means) < 2:
        return None
    text = f"Completion-attack ASR %, mean over seeds, lowest first: measured {ranking(means)}"
    paper = {m: PAPER_COMP[m] for m in means if m in PAPER_COMP}
    if len(paper) < 2:
        return text + "."
    return text + f"; the paper's LLaMA3-70B ablation (Table 4): {ranking(paper)}."


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


def _mixtures(counts: dict[str, dict[str, int]], objectives: dict[str, str]) -> str:
    """`Vanilla (`vanilla`) = 16 vanilla safety; ...`: the safety parts of every recipe (and the
    loss of a row that trains them with another than DeRTa's MLE + RTO)."""
    def parts(recipe: str, c: dict[str, int]) -> str:
        text = " + ".join(f"{n} {PART_NAMES[k]}" for k, n in c.items()
                          if k in PART_NAMES and n >= 0)
        objective = objectives.get(recipe, "derta")
        return text if objective == "derta" else f"{text.replace(' MLE', '')}, loss {objective}"

    return "; ".join(f"{row_label(recipe)} = {parts(recipe, c)}" for recipe, c in counts.items())


def _baseline_lines(workdirs: dict[str, list[pathlib.Path]]) -> list[str]:
    """Set-up bullets of the DPO and constrained-SFT rows, from their first runs' config.json."""
    lines = []
    if workdirs.get("dpo"):
        c = run_config(workdirs["dpo"][0])
        d, o, pairs = c["data"], c["optimizer"], c["data"]["pairs_count"]
        lines.append(
            f"- {row_label('dpo')}: one epoch of DPO (β {c['loss']['beta']:g}, learning rate "
            f"{o['learning_rate']:g} and warmup ratio {o['warmup_ratio']:g} as "
            f"configs/smollm2.py:dpo, {o['schedule']} schedule) from each seed's "
            f"{row_label('vanilla')} workdir, also its reference model: {c['train']['steps']} "
            f"steps of {c['train']['batch_size']} pairs, each response sequence cut to "
            f"{d['max_length'] // 2} tokens. Its data: the first {pairs} safety triples as pairs "
            "(safe response chosen, harmful rejected), those the other rows draw their safety "
            f"examples from, and {d['helpful_count']} helpful pairs: the hand-written demo "
            "answers chosen and their `rejected` answers, written as a weaker model's (a wrong "
            "sum, capital or antonym, a vague tip, empty steps), where the paper's come from "
            "Qwen1.5-0.5B-chat; the self-generated helpful pairs have no rejected answer.")
    if workdirs.get("constrained"):
        c = run_config(workdirs["constrained"][0])
        lc = c["loss"]
        b = lc["beta"]
        first, bias = b * lc["csft_first_token_factor"], b * lc["csft_bias_factor"]
        lines.append(
            f"- {row_label('constrained')}: Qi et al.'s token-wise constrained SFT "
            f"(`loss.objective={lc['objective']}`: β {b:g}, β_1 = {first:g}, "
            f"β_2..{lc['csft_bias_length']} = {bias:g}, then β) on the "
            f"{row_label('recaug')} data ({c['data']['prefix_count']} harmful-prefix recovery "
            "examples and the same helpful pairs), from the untouched model, also its reference; "
            f"{c['train']['steps']} steps at learning rate {c['optimizer']['learning_rate']:g}.")
    return lines


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
    reports, evals, workdirs = results["reports"], results["evals"], results["workdirs"]
    window = max(1, plan.steps // 10)
    losses = {m: [final_losses(w, run_window(w)) for w in ws] for m, ws in workdirs.items()}
    objectives = {m: run_config(ws[0])["loss"]["objective"] for m, ws in workdirs.items() if ws}
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
        f"- Every {'row but ' + row_label('dpo') if 'dpo' in workdirs else 'recipe'}: "
        f"{plan.steps} steps of {config.train.batch_size} examples packed into "
        f"rows of {config.data.max_length} tokens, learning rate "
        f"{config.optimizer.learning_rate:g} ({config.optimizer.schedule}), "
        f"{config.data.template} template, RTO keep {config.loss.rto_keep:g}; {helpful} helpful "
        f"pairs plus {results['budget']} safety examples: "
        f"{_mixtures({m: c for m, c in results['counts'].items() if m != 'dpo'}, objectives)}.",
        *_baseline_lines(workdirs),
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
        f"model). Losses: mean of the last tenth (at least one) of each run's logged steps of "
        f"`metrics.jsonl`, the last {window} for the rows of {plan.steps} steps; '-' where a row "
        "logs no such loss (loss/rto for recipes without RTO examples)."
        + (f" {row_label('dpo')}: loss/dpo is the DPO loss and loss/mle the mean NLL of its "
           "chosen and rejected response tokens, over its safety and helpful pairs."
           if "dpo" in workdirs else "")
        + (f" {row_label('constrained')}: loss/constrained_sft is Qi et al.'s loss per "
           "supervised token, loss/mle the plain NLL of the same tokens."
           if "constrained" in workdirs else ""),
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
