"""Hugging Face `datasets` sources (parquet, arrow, json, saved folders) give the JSON-lines records."""
import json

import datasets
import pytest

from derta_jax.data import pipeline, records
from derta_jax.training import config as config_lib

SAFETY = records.read_jsonl(pipeline.DEMO_SAFETY, "safety")[0]
HELPFUL = records.read_jsonl(pipeline.DEMO_HELPFUL, "helpful")[0]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """The `datasets` cache in the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _write(rows: list[dict], fmt: str, folder) -> str:
    """`rows` as a dataset source of format `fmt`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        ds.to_parquet(folder / "rows.parquet")
        return str(folder / "rows.parquet")
    if fmt == "json":  # one JSON array, as the official helpful files
        (folder / "rows.json").write_text(json.dumps(rows))
        return str(folder / "rows.json")
    if fmt == "arrow":
        ds.save_to_disk(folder / "saved")
        (arrow,) = (folder / "saved").glob("*.arrow")
        return str(arrow)
    if fmt == "saved":
        ds.save_to_disk(folder / "saved")
        return str(folder / "saved")
    datasets.DatasetDict(train=ds.select(range(3)), test=ds).save_to_disk(folder / "saved_dict")
    return str(folder / "saved_dict")


@pytest.mark.parametrize("fmt", ["parquet", "json", "arrow", "saved", "saved_dict"])
def test_dataset_sources_give_the_json_lines_records(tmp_path, fmt):
    safety = _write(SAFETY, fmt, tmp_path / "s")
    helpful = _write(HELPFUL, fmt, tmp_path / "h")
    split = "test" if fmt == "saved_dict" else "train"
    rows, report = records.read_rows(records.Source(safety, split=split), "safety")
    assert rows == SAFETY and report.kept == len(SAFETY)
    counts = dict(helpful_count=20, rto_count=10, prefix_count=10)
    want = pipeline.mixture_records("derta", pipeline.DEMO_SAFETY, pipeline.DEMO_HELPFUL, **counts)
    got = pipeline.mixture_records("derta", records.Source(safety, split), records.Source(helpful, split),
                                   **counts)
    assert got == want and len(got) == 40


def test_column_mapping_reads_other_names_and_names_a_missing_column(tmp_path):
    renamed = [{"prompt": t["query"], "chosen": t["safe_response"], "rejected": t["harmful_response"],
                "instruction": "ignored: query is mapped"} for t in SAFETY]
    path = _write(renamed, "parquet", tmp_path)
    mapping = "query=prompt, safe_response=chosen,harmful_response=rejected"
    assert records.read_rows(records.Source(path, columns=mapping), "safety")[0] == SAFETY
    with pytest.raises(ValueError, match=r"safety dataset '.*rows\.parquet' has no column 'prompt_text' "
                                         r"for 'query' \(columns: prompt, chosen, rejected, instruction\); "
                                         r"map one with data\.safety_columns"):
        records.read_rows(records.Source(path, columns="query=prompt_text,safe_response=chosen,"
                                                       "harmful_response=rejected"), "safety")
    with pytest.raises(ValueError, match="has no column 'safe_response' for 'safe_response'"):
        records.read_rows(records.Source(path, columns="query=prompt,harmful_response=rejected"), "safety")
    jsonl = tmp_path / "renamed.jsonl"  # the mapping applies to JSON lines too
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    assert records.read_rows(records.Source(str(jsonl), columns=mapping), "safety")[0] == SAFETY


def test_bad_dataset_rows_name_the_row_and_skip_invalid_counts_them(tmp_path):
    rows = [dict(SAFETY[0]), {**SAFETY[1], "safe_response": " "}, {**SAFETY[2], "query": None}]
    path = _write(rows, "parquet", tmp_path)
    with pytest.raises(ValueError, match=r"rows\.parquet: row 1: field 'safe_response' is empty"):
        records.read_rows(path, "safety")
    kept, report = records.read_rows(path, "safety", skip_invalid=True)
    assert kept == SAFETY[:1] and report.num_skipped == 2
    assert report.skipped == {"field 'safe_response' is empty": 1, "field 'query' is NoneType, expected a string": 1}


def test_missing_split_file_and_dataset_errors(tmp_path):
    path = _write(SAFETY, "saved_dict", tmp_path)
    with pytest.raises(ValueError, match=r"has no split 'validation' \(splits: train, test\)"):
        records.read_rows(records.Source(path, split="validation"), "safety")
    with pytest.raises(ValueError, match="safety file not found: .*nope.jsonl"):
        records.read_rows(str(tmp_path / "nope.jsonl"), "safety")
    with pytest.raises(ValueError, match=r"helpful dataset '.*nope.parquet' \(split 'train'\) could not be loaded"):
        records.read_rows(str(tmp_path / "nope.parquet"), "helpful")


def _config():
    c = config_lib.base_config()
    c.model.init, c.model.preset, c.model.tokenizer = "random", "smollm2-135m", "tok"
    return c


@pytest.mark.parametrize("spec,match", [
    ("query", r"data\.safety_columns='query': 'query' is not field=column"),
    ("question=prompt", r"data\.safety_columns='question=prompt': 'question' is not a safety field"),
    ("query=a,query=b", "'query' is mapped twice"),
])
def test_bad_column_mapping_names_the_key(spec, match):
    c = _config()
    c.data.safety_columns = spec
    with pytest.raises(ValueError, match=match):
        config_lib.parse(c)


def test_data_config_sources():
    c = _config()
    c.data.helpful, c.data.helpful_split, c.data.helpful_columns = "org/name", "sft", "output=response"
    d = config_lib.parse(c).data
    assert d.source("helpful") == records.Source("org/name", "sft", "", "output=response")
    assert d.source("safety") == records.Source(str(pipeline.DEMO_SAFETY))


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
def test_dataset_sources_in_a_bucket(tmp_path, bucket, fmt):
    """A dataset file or folder in a gs:// bucket is downloaded and read like a local one."""
    from derta_jax import storage
    local = _write(SAFETY, fmt, tmp_path / "s")
    url = f"{bucket}/data-tests/{fmt}/{local.rsplit('/', 1)[-1]}"
    storage.upload(local, url)
    rows, report = records.read_rows(records.Source(url), "safety")
    assert rows == SAFETY and report.kept == len(SAFETY)
    with pytest.raises(ValueError, match=f"safety dataset '{bucket}/data-tests/missing.parquet'"):
        records.read_rows(records.Source(f"{bucket}/data-tests/missing.parquet"), "safety")


def test_json_lines_in_a_bucket_name_the_url_and_line(bucket):
    from derta_jax import storage
    url = f"{bucket}/data-tests/bad.jsonl"
    storage.path(url).write_text(pipeline.DEMO_SAFETY.read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(records.InvalidLine, match=f"{url}:2"):
        records.read_rows(url, "safety")
    rows, report = records.read_rows(records.Source(url), "safety", skip_invalid=True)
    assert len(rows) == 1 and report.num_skipped == 1
    with pytest.raises(ValueError, match=f"safety file not found: {bucket}/data-tests/none.jsonl"):
        records.read_rows(f"{bucket}/data-tests/none.jsonl", "safety")
