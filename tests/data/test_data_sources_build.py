"""TFDS sources (array_record, no TF) keep file order and validation; the build CLI writes the recipe."""
import json
import logging

import numpy as np
import pytest
import transformers

from derta_jax.data import build, pipeline, records, sources
from derta_jax.data.recipe import DertaRecord
from derta_jax.data.tokenize import build_examples


def test_tfds_safety_source_equals_the_validated_file(tmp_path):
    src = sources.load_source("derta_safety", pipeline.DEMO_DIR, tmp_path)
    assert sources.decode(src) == records.read_jsonl(pipeline.DEMO_SAFETY, "safety")[0]


def test_tfds_eval_source_per_test_set(tmp_path):
    src = sources.load_source("derta_eval", pipeline.DEMO_EVAL_DIR, tmp_path, config="helpfulness_arithmetic")
    rows = sources.decode(src)
    assert len(rows) == 20 and rows[0]["answer"].isdigit() and rows[0]["question"].startswith("What is")


def test_tfds_source_reports_bad_lines(tmp_path):
    (tmp_path / "helpful.jsonl").write_text('{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n')
    with pytest.raises(ValueError, match=r"helpful\.jsonl:2: missing field 'output'"):
        sources.load_source("derta_helpful", tmp_path, tmp_path / "tfds")
    with pytest.raises(ValueError, match="derta_eval needs config"):
        sources.load_source("derta_eval", tmp_path, tmp_path)


def test_build_cli_writes_the_official_records(tmp_path):
    out = tmp_path / "derta.jsonl"
    assert build.main(["--recipe", "derta", "--safety", "demo", "--helpful", "demo", "--out", str(out),
                       "--rto-count", "5", "--prefix-count", "4", "--helpful-count", "3"]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["safe"] for r in rows] == ["false"] * 3 + ["true"] * 5 + ["false"] * 4
    triple = records.read_jsonl(pipeline.DEMO_SAFETY, "safety")[0][0]
    assert rows[3] == {"prefix": f"[INST] {triple['query']} [\\INST]",
                       "text": " " + triple["harmful_response"] + "<|end_of_text|>", "safe": "true"}
    assert rows[8]["prefix"] == f"[INST] {triple['query']} [\\INST] "  # source index 0: no harmful prefix
    assert build.main(["--recipe", "derta", "--safety", "demo", "--helpful", "demo", "--out", str(out),
                       "--eos-text", "</s>", "--rto-count", "1", "--prefix-count", "1"]) == 0
    assert [json.loads(l)["text"][-4:] for l in out.read_text().splitlines()] == ["</s>"] * 562


def test_build_cli_official_counts_take_what_the_demo_has(tmp_path, caplog, capsys):
    out = tmp_path / "derta.jsonl"
    argv = ["--recipe", "derta", "--safety", "demo", "--helpful", "demo", "--out", str(out)]
    with caplog.at_level(logging.INFO):
        assert build.main(argv) == 0
    # the demo's 320 triples: 320 RTO, and 320 harmful-prefix examples (all have >= 3 words)
    assert "rto: 320 of the official 3,000 examples (all the sources give)" in caplog.messages
    assert "prefix: 320 of the official 3,000 examples (all the sources give)" in caplog.messages
    assert "recipe derta: 560 helpful + 320 rto + 320 prefix = 1200 records" in caplog.messages
    assert len(out.read_text().splitlines()) == 1200
    capsys.readouterr()
    with pytest.raises(ValueError) as e:
        build.main(argv + ["--rto-count", "321"])
    assert str(e.value) == ("rto_count=321 but the sources give only 320 rto examples; "
                            "pass a smaller rto_count")


@pytest.fixture(scope="module")
def instruct_tokenizer_dir(llama3_tokenizer_dir, tmp_path_factory):
    """The LLaMA-3 fixture as an Instruct tokenizer: its eos is <|eot_id|>, not the literal."""
    folder = tmp_path_factory.mktemp("llama3_instruct")
    tok = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir, eos_token="<|eot_id|>")
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("template,cut", [("base", "word"), ("chat", "token")])
def test_build_and_training_give_the_same_records(tmp_path, instruct_tokenizer_dir, template, cut):
    tok = transformers.AutoTokenizer.from_pretrained(instruct_tokenizer_dir)
    assert tok.eos_token == "<|eot_id|>"
    out = tmp_path / "built.jsonl"
    counts = dict(helpful_count=4, rto_count=3, prefix_count=5)
    assert build.main(["--recipe", "derta", "--safety", "demo", "--helpful", "demo", "--out", str(out),
                       "--template", template, "--cut", cut, "--tokenizer", str(instruct_tokenizer_dir)]
                      + [a for k, v in counts.items() for a in (f"--{k.replace('_', '-')}", str(v))]) == 0
    built = [DertaRecord.from_json(json.loads(l)) for l in out.read_text().splitlines()]
    if template == "base":
        assert all(r.text.endswith("<|end_of_text|>") for r in built)  # the literal, not the tokenizer's eos
    examples, stats = pipeline.training_examples(tok, "derta", template=template, cut=cut, max_length=512,
                                                 **counts)
    from_file, _ = build_examples(built, tok, 512, refusal_id=19701, template_kind=template)
    assert stats.examples == len(built) == 12
    for a, b in zip(examples, from_file):
        assert np.array_equal(a.tokens, b.tokens) and a.prompt_len == b.prompt_len, a
        assert (a.refusal_id, a.cut_len, a.max_cut) == (b.refusal_id, b.cut_len, b.max_cut)
        assert (a.uncut is None) == (b.uncut is None) and (a.uncut is None or np.array_equal(a.uncut, b.uncut))


def test_build_cli_parquet_source_with_columns_writes_the_json_lines_records(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    triples = records.read_jsonl(pipeline.DEMO_SAFETY, "safety")[0]
    renamed = {"query": "prompt", "harmful_response": "rejected", "safe_response": "chosen"}
    datasets.Dataset.from_list([{renamed[k]: v for k, v in t.items()} for t in triples]).to_parquet(
        tmp_path / "safety.parquet")
    counts = ["--rto-count", "7", "--prefix-count", "6", "--helpful-count", "4"]
    base = ["--recipe", "derta", "--helpful", "demo", "--seed", "3", *counts]
    from_jsonl, from_parquet = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert build.main([*base, "--safety", str(pipeline.DEMO_SAFETY), "--out", str(from_jsonl)]) == 0
    columns = ",".join(f"{ours}={theirs}" for ours, theirs in renamed.items())
    assert build.main([*base, "--safety", str(tmp_path / "safety.parquet"), "--safety-split", "train",
                       "--safety-columns", columns, "--out", str(from_parquet)]) == 0
    assert from_parquet.read_text() == from_jsonl.read_text()
    assert len(from_parquet.read_text().splitlines()) == 4 + 7 + 6
    with pytest.raises(ValueError, match="rejected"):  # without the mapping: its columns are unknown
        build.main([*base, "--safety", str(tmp_path / "safety.parquet"), "--out", str(from_parquet)])


HELPFUL_PAIRS = ('{"instruction": "Name a colour.", "output": "Blue.", "rejected": "No."}\n'
                 '{"instruction": "Count to two.", "output": "One, two."}\n')


def test_tfds_helpful_source_keeps_an_optional_rejected_answer(tmp_path):
    (tmp_path / "helpful.jsonl").write_text(HELPFUL_PAIRS)
    rows = sources.decode(sources.load_source("derta_helpful", tmp_path, tmp_path / "tfds"))
    assert rows == records.read_jsonl(tmp_path / "helpful.jsonl", "helpful")[0]
    assert rows[0]["rejected"] == "No." and "rejected" not in rows[1]


def test_a_bad_rejected_answer_names_the_line(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"instruction": "i", "output": "o", "rejected": 3}\n')
    with pytest.raises(ValueError, match=r"h\.jsonl:1: field 'rejected' is int, expected a string"):
        records.read_jsonl(path, "helpful")
    assert records.read_jsonl(path, "helpful", skip_invalid=True)[1].skipped


def test_build_cli_writes_preference_pairs(tmp_path, caplog):
    (tmp_path / "helpful.jsonl").write_text(HELPFUL_PAIRS)
    out = tmp_path / "pairs.jsonl"
    with caplog.at_level(logging.INFO):
        assert build.main(["--recipe", "preference", "--safety", "demo", "--helpful",
                           str(tmp_path / "helpful.jsonl"), "--out", str(out),
                           "--pairs-count", "2"]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    triple = records.read_jsonl(pipeline.DEMO_SAFETY, "safety")[0][0]
    assert rows[0] == {"prefix": "[INST] Name a colour. [\\INST]", "chosen": " Blue.<|end_of_text|>",
                       "rejected": " No.<|end_of_text|>"}
    assert rows[1] == {"prefix": f"[INST] {triple['query']} [\\INST]",
                       "chosen": f" {triple['safe_response']}<|end_of_text|>",
                       "rejected": f" {triple['harmful_response']}<|end_of_text|>"}
    assert len(rows) == 3 and "1 of 2 helpful rows have no 'rejected' answer" in caplog.text
    with pytest.raises(ValueError, match="rto_count=1 given but recipe 'preference' has no rto"):
        pipeline.mixture_records("preference", pipeline.DEMO_SAFETY, pipeline.DEMO_HELPFUL, rto_count=1)
    with pytest.raises(ValueError, match="pairs_count=1 given but recipe 'derta' has no pairs"):
        pipeline.mixture_records("derta", pipeline.DEMO_SAFETY, pipeline.DEMO_HELPFUL, pairs_count=1)


def test_pairs_pack_as_neighbouring_segments(llama3_tokenizer_dir):
    """Both sequences of a pair in one row: segments 2j+1 (chosen) and 2j+2 (rejected), positions
    restarting, loss on the responses only, each cut to max_length // 2."""
    from derta_jax.data import loader
    from derta_jax.data.recipe import PairRecord
    from derta_jax.data.tokenize import build_pair_examples
    tok = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir, trust_remote_code=False)
    recs = [PairRecord("[INST] q1 [\\INST]", " yes please", " no thanks at all"),
            PairRecord("[INST] another question [\\INST]", " a", " " + "word " * 40)]
    examples, stats = build_pair_examples(recs, tok, max_length=32)
    assert stats.truncated == 1 and all(len(ex.rejected) <= 16 for ex in examples)
    plan = loader.make_plan(examples, 2, 32, seed=0, steps=1)
    batch = loader.step_batch(examples, plan, 0, 0)
    assert plan.rows_per_step == 2  # each pair fills most of a row of 32
    for r in range(2):
        seg = batch["segment_ids"][r]
        assert set(seg) - {0} == {1, 2}
        for s in (1, 2):
            assert list(batch["positions"][r][seg == s]) == list(range((seg == s).sum()))
    for ex in examples:  # its row: prompt + chosen (loss after the prompt), then prompt + rejected
        r = next(r for r in range(2) if list(batch["tokens"][r][:len(ex.tokens)]) == list(ex.tokens))
        n_c, n_r = len(ex.tokens), len(ex.rejected)
        assert list(batch["tokens"][r][n_c:n_c + n_r]) == list(ex.rejected)
        for start, n in ((0, n_c), (n_c, n_r)):
            want = np.zeros(n, bool)
            want[ex.prompt_len - 1:n - 1] = True
            np.testing.assert_array_equal(batch["loss_mask"][r][start:start + n], want)
