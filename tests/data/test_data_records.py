"""Bad input lines fail with file, line and reason, or are skipped and counted with skip_invalid."""
import json

import pytest

from derta_jax.data import records

GOOD = {"query": "q", "harmful_response": "h", "safe_response": "s"}
BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"query": "q", "harmful_response": "h"}), "missing field 'safe_response'"),
    (json.dumps({**GOOD, "query": "  "}), "field 'query' is empty"),
    (json.dumps({**GOOD, "safe_response": 3}), "field 'safe_response' is int, expected a string"),
    (json.dumps({**GOOD, "instruction": "q2"}), "both 'query' and 'instruction'"),
]


def _write(tmp_path, lines):
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    path = _write(tmp_path, [json.dumps(GOOD), "", line])
    with pytest.raises(ValueError, match=rf"f\.jsonl:3: .*{reason}"):
        records.read_jsonl(path, "safety")


def test_skip_invalid_counts_each_reason(tmp_path):
    path = _write(tmp_path, [json.dumps(GOOD)] + [l for l, _ in BAD_LINES] + [BAD_LINES[0][0]])
    rows, report = records.read_jsonl(path, "safety", skip_invalid=True)
    assert rows == [GOOD] and report.kept == 1 and report.num_skipped == 7
    assert report.skipped["not valid JSON"] == 2
    assert "skipped 7" in str(report)


def test_official_keys_and_eval_answers(tmp_path):
    path = _write(tmp_path, [json.dumps({"instruction": "q", "output": "h", "safe_response": "s", "x": 1})])
    assert records.read_jsonl(path, "safety")[0] == [GOOD]
    path = _write(tmp_path, [json.dumps({"question": "2+2?", "answer": 4}), json.dumps({"question": "hi"})])
    assert records.read_jsonl(path, "eval")[0] == [{"question": "2+2?", "answer": "4"}, {"question": "hi"}]
    path = _write(tmp_path, [json.dumps({"question": "q", "answer": [1]})])
    with pytest.raises(ValueError, match="'answer' is list"):
        records.read_jsonl(path, "eval")


def test_missing_file_and_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="safety file not found: .*nope"):
        records.read_jsonl(tmp_path / "nope.jsonl", "safety")
    with pytest.raises(ValueError, match="unknown record kind 'x'"):
        records.parse_record({}, "x")


def test_non_utf8_line_names_file_and_line_and_is_skipped_when_asked(tmp_path):
    path = tmp_path / "f.jsonl"
    latin1 = json.dumps({**GOOD, "query": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1 + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(ValueError, match=r"f\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 15\)"):
        records.read_jsonl(path, "safety")
    rows, report = records.read_jsonl(path, "safety", skip_invalid=True)
    assert rows == [GOOD, GOOD] and report.skipped == {"not valid UTF-8": 1}
