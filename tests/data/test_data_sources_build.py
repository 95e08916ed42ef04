"""TFDS sources (array_record, no TF) keep file order and validation; the build CLI writes the recipe."""
import json

import pytest

from derta_jax.data import build, pipeline, records, sources


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
    assert build.main(["--recipe", "derta", "--safety", "demo", "--helpful", "demo", "--out", str(out)]) == 2
