"""The ablation machinery on a tiny random model: real trainings and evaluations, then the report.

Checks what the report is built from against the files the runs wrote (metrics.jsonl, the eval
answers), never against the report code's own helpers.
"""
import json
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
TINY = ["train.batch_size=8", "data.max_length=64", "data.helpful_count=16", "data.rto_count=8",
        "data.prefix_count=8", "checkpoint.async_save=false", "loss.chunk_size=32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama3_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_ids=(128001,))
    params = init_variables(cfg, jax.random.key(1))["params"]
    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny", cfg, params, tokenizer)


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("ablation")
    argv = ["--out", str(out / "runs"), "--model-dir", str(model_dir),
            "--config", str(ROOT / "configs" / "tiny.py"), "--seeds", "0,1", "--steps", "2",
            "--limit", "2", "--max-new-tokens", "4", "--batch-size", "2",
            "--doc", str(out / "ablation.md"), "--figure", str(out / "fig" / "positions.png"),
            *[a for o in TINY for a in ("--set", o)]]
    markdown = ablation.main(argv)
    return out, markdown, argv


def table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """The results table (the first Markdown table): header and rows by model label."""
    section = markdown.split("## Results")[1]
    lines = section[section.index("|"):].split("\n\n")[0].splitlines()
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    return cells[0], {row[0]: row[1:] for row in cells[2:]}


def test_table_has_the_five_models_and_the_ablation_columns(ablation_run):
    out, markdown, _ = ablation_run
    header, rows = table(markdown)
    assert header == ["model", "Comp ASR %", "harmful_questions ASR %", "Over-refusal %",
                      "Over-refusal (broad) %", "Over-refusal (howto) %", "loss/mle", "loss/rto"]
    assert list(rows) == ["untouched", "Vanilla (`vanilla`)", "+Harmful Prefix (`recaug`)",
                          "+RTO (`rto_only`)", "DeRTa (`derta`)"]
    assert (out / "ablation.md").read_text() == markdown
    assert (out / "fig" / "positions.png").stat().st_size > 0


def test_losses_come_from_the_last_step_of_each_seed(ablation_run):
    out, markdown, _ = ablation_run
    header, rows = table(markdown)
    mle_col, rto_col = header.index("loss/mle") - 1, header.index("loss/rto") - 1
    for recipe, label in [("derta", "DeRTa (`derta`)"), ("vanilla", "Vanilla (`vanilla`)")]:
        last = [json.loads((out / "runs" / "train" / f"{recipe}-s{s}" / "metrics.jsonl")
                           .read_text().splitlines()[-1]) for s in (0, 1)]
        assert [m["step"] for m in last] == [2, 2]
        mle = [m["loss/mle"] for m in last]
        assert rows[label][mle_col] == f"{statistics.mean(mle):.2f} ± {statistics.stdev(mle):.2f}"
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


def test_recipes_get_the_same_budget(ablation_run):
    out, _, _ = ablation_run
    for recipe, parts in [("vanilla", {"vanilla_count": 16}), ("recaug", {"prefix_count": 16}),
                          ("rto_only", {"rto_count": 8, "vanilla_count": 8}),
                          ("derta", {"rto_count": 8, "prefix_count": 8})]:
        config = json.loads((out / "runs" / "train" / f"{recipe}-s1" / "config.json").read_text())
        counts = {k: v for k, v in config["data"].items() if k.endswith("_count") and v >= 0}
        assert counts == {"helpful_count": 16, **parts}, recipe
        assert config["data"]["recipe"] == recipe
        assert config["train"]["seed"] == config["data"]["seed"] == 1
        assert config["train"]["steps"] == 2


def test_a_rerun_skips_finished_work(ablation_run, monkeypatch):
    out, markdown, argv = ablation_run
    from derta_jax import eval as eval_cli

    def refuse(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(ablation.loop, "train", refuse)
    monkeypatch.setattr(eval_cli, "evaluate", refuse)
    again = ablation.main(argv)
    assert table(again) == table(markdown)


def test_bad_override_and_budget_are_named(tmp_path):
    config = ablation.load_config_file(str(ROOT / "configs" / "tiny.py"))
    with pytest.raises(ValueError, match="no key 'train.stepz'"):
        ablation.apply_override(config, "train.stepz=3")
    with pytest.raises(ValueError, match="train.steps takes a int"):
        ablation.apply_override(config, "train.steps=three")
    config.data.rto_count = -1
    with pytest.raises(ValueError, match="data.rto_count=-1"):
        ablation.safety_budget(config)
