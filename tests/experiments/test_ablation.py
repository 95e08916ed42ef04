"""The ablation machinery on a tiny random model: real trainings and evaluations, then the report.

Checks what the report is built from against the files the runs wrote (metrics.jsonl, the eval
answers, config.json), never against the report code's own helpers. The quick run trains the four
recipes on two seeds, then the DPO row is added to its run folder for seed 0 (what a rerun with
more rows does: only the new run is trained and evaluated); the constrained-SFT row, a recipe's run
with another loss, is checked without training, to keep the run short. S = 24 safety examples and
8 examples per step make the DPO row's one epoch (ceil(24 / 8) = 3 steps) differ from the plan's
2 steps.
"""
import json
import math
import pathlib
import statistics

import jax
import pytest
from transformers import AutoTokenizer

from derta_jax.checkpoints.model_dir import save_model_dir
from derta_jax.experiments import ablation
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import init_variables

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["train.batch_size=8", "data.max_length=64", "data.helpful_count=16", "data.rto_count=12",
        "data.prefix_count=12", "checkpoint.async_save=false", "loss.chunk_size=32"]
LABELS = {"vanilla": "Vanilla (`vanilla`)", "recaug": "+Harmful Prefix (`recaug`)",
          "rto_only": "+RTO (`rto_only`)", "derta": "DeRTa (`derta`)",
          "dpo": "Vanilla + DPO (`dpo`)",
          "constrained": "Constrained SFT (Qi et al.) (`constrained`)"}
DPO_STEPS = math.ceil((24 + 16) / 8)  # one epoch: the S = 24 safety pairs and 16 helpful, 8 a step
RECIPES = ("vanilla", "recaug", "rto_only", "derta")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama3_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_ids=(128001,))
    params = init_variables(cfg, jax.random.key(1))["params"]
    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny", cfg, params, tokenizer)


def quick_argv(out: pathlib.Path, model_dir: pathlib.Path, seeds: str, rows: tuple[str, ...],
               name: str) -> list[str]:
    return ["--out", str(out / "runs"), "--model-dir", str(model_dir),
            "--config", str(ROOT / "configs" / "tiny.py"), "--seeds", seeds, "--steps", "2",
            "--limit", "2", "--max-new-tokens", "4", "--batch-size", "2",
            "--recipes", ",".join(rows),
            "--doc", str(out / f"{name}.md"), "--figure", str(out / "fig" / f"{name}.png"),
            *[a for o in TINY for a in ("--set", o)]]


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("ablation")
    argv = quick_argv(out, model_dir, "0,1", RECIPES, "ablation")
    markdown = ablation.main(argv)
    return out, markdown, argv


@pytest.fixture(scope="module")
def dpo_run(ablation_run, model_dir):
    """The DPO row added to the finished run folder for seed 0: (markdown, argv, the train and
    eval jobs this second command ran)."""
    out, _, _ = ablation_run
    timings = out / "runs" / "timings.json"
    before = json.loads(timings.read_text())
    argv = quick_argv(out, model_dir, "0", (*RECIPES, "dpo"), "ablation-dpo")
    markdown = ablation.main(argv)
    after = json.loads(timings.read_text())
    ran = {part: sorted(set(after[part]) - set(before[part])) for part in ("train", "eval")}
    return markdown, argv, ran


def table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """The results table (the first Markdown table): header and rows by model label."""
    section = markdown.split("## Results")[1]
    lines = section[section.index("|"):].split("\n\n")[0].splitlines()
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    return cells[0], {row[0]: row[1:] for row in cells[2:]}


def last_metrics(out: pathlib.Path, run: str) -> dict:
    return json.loads((out / "runs" / "train" / run / "metrics.jsonl").read_text().splitlines()[-1])


COLUMNS = ["model", "Comp ASR %", "harmful_questions ASR %", "Over-refusal %",
           "Over-refusal (broad) %", "Over-refusal (howto) %", "loss/mle", "loss/rto"]


def test_table_has_the_five_models_and_the_ablation_columns(ablation_run):
    out, markdown, _ = ablation_run
    header, rows = table(markdown)
    assert header == COLUMNS
    assert list(rows) == ["untouched", *(LABELS[r] for r in RECIPES)]
    assert (out / "ablation.md").read_text() == markdown
    assert (out / "fig" / "ablation.png").stat().st_size > 0


def test_losses_come_from_the_last_step_of_each_seed(ablation_run):
    out, markdown, _ = ablation_run
    header, rows = table(markdown)
    mle_col, rto_col = header.index("loss/mle") - 1, header.index("loss/rto") - 1
    for recipe in ("derta", "vanilla"):
        last = [last_metrics(out, f"{recipe}-s{s}") for s in (0, 1)]
        assert [m["step"] for m in last] == [2, 2]
        mle = [m["loss/mle"] for m in last]
        assert rows[LABELS[recipe]][mle_col] == \
            f"{statistics.mean(mle):.2f} ± {statistics.stdev(mle):.2f}"
    # No RTO example in vanilla: no RTO loss to report; DeRTa has one.
    assert rows["Vanilla (`vanilla`)"][rto_col] == "-"
    assert rows["DeRTa (`derta`)"][rto_col] != "-"
    assert rows["untouched"][mle_col:] == ["-", "-"]


def test_asr_is_the_share_of_unrefused_attack_answers(ablation_run):
    out, markdown, _ = ablation_run
    _, rows = table(markdown)
    for recipe, label in [("recaug", "+Harmful Prefix (`recaug`)"),
                          ("rto_only", "+RTO (`rto_only`)")]:
        asr = []
        for s in (0, 1):
            answers = [json.loads(l) for l in (out / "runs" / "eval" / f"{recipe}-s{s}" /
                                               "completionattack.jsonl").read_text().splitlines()]
            assert len(answers) == 2
            asr.append(100.0 * sum(a["judges"]["refusal"]["harmful"] for a in answers) / 2)
        assert rows[label][0] == f"{statistics.mean(asr):.1f} ± {statistics.stdev(asr):.1f}"


def test_sample_answers_are_each_models_first_answer(ablation_run):
    out, markdown, _ = ablation_run
    section = markdown.split("## Sample answers")[1].split("## Timings")[0]
    for set_name in ("completionattack", "howto"):
        block = section.split(f"**{set_name}**")[1].split("\n\n")[1]
        for name, label in [("untouched", "untouched"), ("derta-s0", "DeRTa (`derta`)")]:
            first = json.loads((out / "runs" / "eval" / name / f"{set_name}.jsonl")
                               .read_text().splitlines()[0])
            cell = first["response"].replace("\n", " ").replace("|", "\\|").replace("`", "'")[:160]
            assert f"| {label} | {cell}" in block, (set_name, label)


def test_recipes_get_the_same_budget(ablation_run, model_dir):
    out, _, _ = ablation_run
    for recipe, parts in [("vanilla", {"vanilla_count": 24}), ("recaug", {"prefix_count": 24}),
                          ("rto_only", {"rto_count": 12, "vanilla_count": 12}),
                          ("derta", {"rto_count": 12, "prefix_count": 12})]:
        config = json.loads((out / "runs" / "train" / f"{recipe}-s1" / "config.json").read_text())
        counts = {k: v for k, v in config["data"].items() if k.endswith("_count") and v >= 0}
        assert counts == {"helpful_count": 16, **parts}, recipe
        assert (config["data"]["recipe"], config["loss"]["objective"]) == (recipe, "derta")
        assert config["model"]["checkpoint"] == str(model_dir)  # the untouched model
        assert config["train"]["seed"] == config["data"]["seed"] == 1
        assert config["train"]["steps"] == 2


def test_the_dpo_row_joins_a_finished_run_and_the_table(ablation_run, dpo_run):
    out, _, _ = ablation_run
    markdown, _, ran = dpo_run
    assert ran == {"train": ["dpo-s0"], "eval": ["dpo-s0"]}  # the rest was reused
    header, rows = table(markdown)
    assert header == [*COLUMNS, "loss/dpo"]
    assert list(rows) == ["untouched", *(LABELS[r] for r in (*RECIPES, "dpo"))]
    last = last_metrics(out, "dpo-s0")
    assert last["step"] == DPO_STEPS
    dpo = dict(zip(header[1:], rows[LABELS["dpo"]]))
    assert (dpo["loss/mle"], dpo["loss/rto"], dpo["loss/dpo"]) == \
        (f"{last['loss/mle']:.2f}", "-", f"{last['loss/dpo']:.2f}")  # one seed: its value
    assert dict(zip(header[1:], rows[LABELS["derta"]]))["loss/dpo"] == "-"
    answers = (out / "runs" / "eval" / "dpo-s0" / "completionattack.jsonl").read_text()
    asr = [json.loads(l)["judges"]["refusal"]["harmful"] for l in answers.splitlines()]
    assert dpo["Comp ASR %"] == f"{100.0 * sum(asr) / len(asr):.1f}"
    assert "and 16 helpful pairs" in markdown.split("## Results")[0]
    ordering = next(l for l in markdown.splitlines() if l.startswith("Completion-attack ASR"))
    measured, paper = ordering.split("; the paper's")
    assert "Vanilla + DPO" in measured and "DPO" not in paper  # Table 4 has the four recipes


def test_dpo_continues_the_seeds_vanilla_run_on_the_safety_pairs(ablation_run, dpo_run):
    out, _, _ = ablation_run
    config = json.loads((out / "runs" / "train" / "dpo-s0" / "config.json").read_text())
    counts = {k: v for k, v in config["data"].items() if k.endswith("_count") and v >= 0}
    assert counts == {"helpful_count": 16, "pairs_count": 24}  # the S triples, as pairs, and the
    # helpful rows with a rejected answer (all the demo's, cut to data.helpful_count)
    assert config["model"]["checkpoint"] == str(out / "runs" / "train" / "vanilla-s0")
    assert (config["data"]["recipe"], config["loss"]["objective"], config["loss"]["beta"],
            config["data"]["max_length"]) == ("preference", "dpo", 0.1, 128)
    assert config["optimizer"]["learning_rate"] == ablation.load_config_file(
        str(ROOT / "configs" / "smollm2.py:dpo")).optimizer.learning_rate
    assert (config["train"]["steps"], config["train"]["seed"]) == (DPO_STEPS, 0)
    assert (out / "runs" / "train" / "dpo-s0" / "reference_logps.npz").exists()
    assert last_metrics(out, "dpo-s0")["pairs"] > 0


def test_a_rerun_skips_finished_work(ablation_run, dpo_run, monkeypatch):
    """Also the DPO run, finished at its own step count (3), not the plan's (2)."""
    out, markdown, argv = ablation_run
    from derta_jax import eval as eval_cli

    def refuse(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(ablation.loop, "train", refuse)
    monkeypatch.setattr(eval_cli, "evaluate", refuse)
    assert table(ablation.main(argv)) == table(markdown)
    assert table(ablation.main(dpo_run[1])) == table(dpo_run[0])


def test_bad_override_and_budget_are_named(tmp_path):
    config = ablation.load_config_file(str(ROOT / "configs" / "tiny.py"))
    with pytest.raises(ValueError, match="no key 'train.stepz'"):
        ablation.apply_override(config, "train.stepz=3")
    with pytest.raises(ValueError, match="train.steps takes a int"):
        ablation.apply_override(config, "train.steps=three")
    config.data.rto_count = -1
    with pytest.raises(ValueError, match="data.rto_count=-1"):
        ablation.safety_budget(config)


def test_run_overrides_of_every_row_validate(tmp_path):
    """No training: each row's overrides on the base config, parsed by the run's own validation;
    the batch size 5 makes the DPO row's one epoch ceil(16 / 5) = 4 steps against the plan's 3."""
    from derta_jax.training.config import validate
    tiny = [*TINY, "data.rto_count=8", "data.prefix_count=8", "train.batch_size=5"]
    plan = ablation.Plan(out=tmp_path / "runs", model_dir=tmp_path / "model",
                         config=str(ROOT / "configs" / "tiny.py"), overrides=tuple(tiny), steps=3)
    assert plan.recipes == tuple(LABELS)  # all six rows by default
    common = [f"model.checkpoint={tmp_path / 'model'}", "model.init=checkpoint"]
    run = ["data.seed=1", "train.seed=1", "train.steps=3", "train.log_every=1",
           "checkpoint.every_steps=3", "checkpoint.keep=1"]
    assert ablation.run_overrides(plan, "rto_only", 1) == [
        *tiny, *common, "data.recipe=rto_only", "loss.objective=derta", *run,
        "data.rto_count=8", "data.prefix_count=-1", "data.vanilla_count=8"]
    assert ablation.run_overrides(plan, "constrained", 1) == [
        *tiny, *common, "data.recipe=recaug", "loss.objective=constrained_sft", *run,
        "data.rto_count=-1", "data.prefix_count=16", "data.vanilla_count=-1"]
    dpo = ablation.load_config_file(str(ROOT / "configs" / "smollm2.py:dpo"))
    assert ablation.run_overrides(plan, "dpo", 1) == [
        *tiny, f"model.checkpoint={tmp_path / 'runs' / 'train' / 'vanilla-s1'}",
        "model.init=checkpoint", "data.recipe=preference", "loss.objective=dpo",
        "data.seed=1", "train.seed=1", "train.steps=7", "train.log_every=1",
        "checkpoint.every_steps=7", "checkpoint.keep=1", "data.rto_count=-1",
        "data.prefix_count=-1", "data.vanilla_count=-1", "data.pairs_count=16",
        "data.helpful_count=16", "data.max_length=128",
        f"optimizer.learning_rate={dpo.optimizer.learning_rate}",
        f"optimizer.warmup_ratio={dpo.optimizer.warmup_ratio}", f"loss.beta={dpo.loss.beta}"]
    assert [ablation.row_steps(plan, r) for r in plan.recipes] == [3, 3, 3, 3, 7, 3]  # dpo: 16 + 16
    # pairs, 5 a step
    for recipe in plan.recipes:
        validate(ablation.run_config(plan, recipe, 1))


def test_recipes_flag_picks_rows(tmp_path):
    base = ["--out", str(tmp_path), "--config", str(ROOT / "configs" / "tiny.py")]
    plan, _, _ = ablation.plan_from_args(ablation._parse([*base, "--recipes", "dpo,derta"]))
    assert plan.recipes == ("dpo", "derta")
    for bad in ("dpo,nope", "dpo,dpo"):
        with pytest.raises(ValueError, match="--recipes"):
            ablation.plan_from_args(ablation._parse([*base, "--recipes", bad]))


def test_report_shows_the_losses_each_row_logs(tmp_path):
    """No training: metrics.jsonl rows as the DeRTa, DPO and constrained-SFT steps log them
    (training/loss.py, training/preference.py); a loss a row does not log is '-'."""
    from derta_jax.experiments import ablation_report
    logged = {
        "derta": [{"step": s, "loss": 1.0, "loss/mle": 0.5 + s, "loss/rto": 0.25,
                   "tokens/rto": 3.0} for s in (1, 2)],
        "dpo": [{"step": s, "loss": 0.6, "loss/mle": 2.0, "loss/dpo": 0.7 - 0.1 * s,
                 "reward/margin": 0.1, "tokens/mle": 9.0} for s in (1, 2, 3)],
        "constrained": [{"step": s, "loss": 1.5, "loss/mle": 1.0 * s,
                         "loss/constrained_sft": 3.0, "tokens/mle": 9.0} for s in (1, 2)],
    }
    losses = {}
    for row, metrics in logged.items():
        (tmp_path / row).mkdir()
        (tmp_path / row / "metrics.jsonl").write_text(
            "".join(json.dumps(m) + "\n" for m in metrics))
        losses[row] = [ablation_report.final_losses(tmp_path / row, window=2)]
    assert losses["constrained"] == [{"loss/mle": 1.5, "loss/rto": None,
                                      "loss/constrained_sft": 3.0}]
    report = {"table": {"Comp": 50.0}, "sets": {"completionattack": {"kind": "completion"}}}
    header, rows = ablation_report.results_table(
        {"untouched": [report], **{row: [report] for row in logged}}, losses)
    assert header == ["model", "Comp ASR %", "loss/mle", "loss/rto", "loss/dpo",
                      "loss/constrained_sft"]
    assert rows == [["untouched", "50.0", "-", "-", "-", "-"],
                    ["DeRTa (`derta`)", "50.0", "2.00", "0.25", "-", "-"],
                    ["Vanilla + DPO (`dpo`)", "50.0", "2.00", "-", "0.45", "-"],
                    [LABELS["constrained"], "50.0", "1.50", "-", "-", "3.00"]]


def test_set_up_describes_the_baseline_rows(tmp_path):
    """No training: the set-up bullets of the DPO and constrained rows, from the config.json
    their runs would write (the constrained row is not trained end to end here)."""
    from derta_jax.experiments import ablation_report
    plan = ablation.Plan(out=tmp_path / "runs", model_dir=tmp_path / "model",
                         config=str(ROOT / "configs" / "tiny.py"), overrides=tuple(TINY), steps=2)
    workdirs = {}
    for row in ("recaug", "dpo", "constrained"):
        workdir = tmp_path / row
        workdir.mkdir()
        (workdir / "config.json").write_text(ablation.run_config(plan, row, 0).to_json())
        workdirs[row] = [workdir]
    dpo, constrained = ablation_report._baseline_lines(workdirs)
    assert "5 steps of 8 pairs" in dpo and "the first 24 safety triples" in dpo
    assert "and 16 helpful pairs" in dpo
    assert "β 0.1, β_1 = 0.5, β_2..5 = 2, then β" in constrained
    assert "24 harmful-prefix recovery examples" in constrained and "2 steps" in constrained
    objectives = {r: ablation_report.run_config(w[0])["loss"]["objective"]
                  for r, w in workdirs.items()}
    counts = {r: ablation.recipe_counts(r, 24) for r in ("recaug", "constrained")}
    assert ablation_report._mixtures(counts, objectives) == (
        "+Harmful Prefix (`recaug`) = 24 harmful-prefix MLE; Constrained SFT (Qi et al.) "
        "(`constrained`) = 24 harmful-prefix, loss constrained_sft")
