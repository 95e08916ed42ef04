"""python -m derta_jax.eval with gs:// paths (a fake bucket, tests/fake_bucket.py): test files and
--out in the bucket give what a local run gives, a resumed run keeps the rows already there, and
`judge` / `compare` read and write bucket dirs. The checkpoint stays local."""
import json
import pathlib
import uuid

import pytest

from derta_jax import cli, storage
from derta_jax import eval as eval_cli
from tests.evaluation import test_eval_cli as local_eval
from tests.evaluation.test_eval_cli import read_rows, run

# test_eval_cli's fixtures: its tiny model, its test files, and its local run to compare with.
model_dir, test_files, answered = local_eval.model_dir, local_eval.test_files, local_eval.answered

SETS = ("completionattack", "gsm8k", "alpacaeval")


@pytest.fixture(scope="module")
def prefix(bucket):
    return f"{bucket}/eval-tests/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def bucket_tests(test_files, prefix):
    """The test files of test_eval_cli (JSON lines and JSON arrays), uploaded to the bucket."""
    urls = []
    for f in test_files.split(","):
        storage.upload(f, f"{prefix}/tests/{pathlib.Path(f).name}")
        urls.append(f"{prefix}/tests/{pathlib.Path(f).name}")
    return ",".join(urls)


@pytest.fixture(scope="module")
def bucket_answered(model_dir, bucket_tests, prefix):
    """(out URL, report) of the eval run with its test files and --out in the bucket."""
    out = f"{prefix}/out"
    return out, run(model_dir, bucket_tests, out)


def bucket_rows(url):
    return [json.loads(line) for line in storage.path(url).read_text().splitlines()]


def without_throughput(rep):
    return {k: v for k, v in rep.items() if k != "throughput"}  # timings differ run to run


def test_eval_into_the_bucket_equals_a_local_run(answered, bucket_answered):
    (local, local_rep), (out, rep) = answered, bucket_answered
    assert out.startswith("gs://") and not pathlib.Path("gs:").exists()  # no gs:/ folder here
    for name in SETS:
        assert bucket_rows(f"{out}/{name}.jsonl") == read_rows(local / f"{name}.jsonl")
    assert without_throughput(rep) == without_throughput(local_rep)
    remote = storage.path(out)
    assert json.loads((remote / "report.json").read_text()) == rep
    assert (remote / "report.md").read_text() == (local / "report.md").read_text()
    assert (remote / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((remote / "alpacaeval_outputs.json").read_text()) == \
        json.loads((local / "alpacaeval_outputs.json").read_text())
    run_json = json.loads((remote / "run.json").read_text())
    tests_dir = out.rsplit("/", 1)[0] + "/tests"
    assert run_json["sets"]["gsm8k"]["path"] == f"{tests_dir}/helpfulness_gsm8k_1.json"
    assert run_json["checkpoint"] == json.loads((local / "run.json").read_text())["checkpoint"]


def test_a_run_resumed_in_the_bucket_keeps_the_earlier_rows(answered, model_dir, bucket_tests,
                                                            prefix):
    """Killed while writing row 2 of completionattack: rows 0-1 stay (not regenerated), row 2 is
    answered again, the other sets from scratch. An append through gcsfs's open("a") would
    overwrite rows 0-1."""
    local, _ = answered
    lines = (local / "completionattack.jsonl").read_text().splitlines(keepends=True)
    kept = json.loads(lines[0])
    kept["response"] = "written by the first run"  # a regenerated row 0 would not say this
    out = f"{prefix}/resumed"
    storage.path(f"{out}/completionattack.jsonl").write_text(
        json.dumps(kept) + "\n" + lines[1] + lines[2][:30])
    rep = run(model_dir, bucket_tests, out)
    rows = bucket_rows(f"{out}/completionattack.jsonl")
    assert rows == [kept] + read_rows(local / "completionattack.jsonl")[1:]
    for name in ("gsm8k", "alpacaeval"):
        assert bucket_rows(f"{out}/{name}.jsonl") == read_rows(local / f"{name}.jsonl")
    sets = json.loads(storage.path(f"{out}/run.json").read_text())["sets"]
    assert {n: s["answered_now"] for n, s in sets.items()} == {"completionattack": 1, "gsm8k": 1,
                                                               "alpacaeval": 1}
    assert rep["sets"]["completionattack"]["n"] == 3
    # Again: nothing answered, nothing lost.
    run(model_dir, bucket_tests, out)
    sets = json.loads(storage.path(f"{out}/run.json").read_text())["sets"]
    assert all(s["answered_now"] == 0 for s in sets.values())
    assert bucket_rows(f"{out}/completionattack.jsonl") == rows


def test_judge_and_compare_read_and_write_bucket_dirs(answered, bucket_answered, model_dir,
                                                      prefix, tmp_path):
    (local, _), (out, _) = answered, bucket_answered
    phrases = "# refusals\nsorry\nI cannot\n"
    storage.path(f"{prefix}/phrases.txt").write_text(phrases)
    (tmp_path / "phrases.txt").write_text(phrases)
    answers = lambda d: f"{d}/completionattack.jsonl,{d}/gsm8k.jsonl"  # noqa: E731
    rep = eval_cli.main(["judge", "--answers", answers(out), "--out", f"{prefix}/first5",
                         "--judge", f"refusal-first5:{prefix}/phrases.txt"])
    want = eval_cli.main(["judge", "--answers", answers(local), "--out", str(tmp_path / "first5"),
                          "--judge", f"refusal-first5:{tmp_path / 'phrases.txt'}"])
    assert rep == want and rep["model"] == "tiny"  # the model from run.json beside the answers
    for name in ("completionattack", "gsm8k"):
        assert bucket_rows(f"{prefix}/first5/{name}.jsonl") == \
            read_rows(tmp_path / "first5" / f"{name}.jsonl")
    assert storage.path(f"{prefix}/first5/report.png").read_bytes()[:4] == b"\x89PNG"
    # No run.json beside the answers: the model is named after their bucket folder.
    storage.path(f"{prefix}/edited/pair.jsonl").write_text(
        json.dumps({"question": "q", "response": "Sorry, I cannot."}) + "\n")
    rep = eval_cli.main(["judge", "--answers", f"{prefix}/edited/pair.jsonl", "--tokenizer",
                         str(model_dir), "--out", f"{prefix}/edited-judged"])
    assert rep["model"] == "edited" and rep["sets"]["pair"]["asr"] == 0.0
    # compare: two bucket runs of one model, told apart by their folders.
    reports = eval_cli.main(["compare", out, f"{prefix}/first5", "--out", f"{prefix}/cmp"])
    assert [r["model"] for r in reports] == ["tiny (out)", "tiny (first5)"]
    assert json.loads(storage.path(f"{prefix}/cmp/compare.json").read_text()) == reports
    assert "| tiny (first5) |" in storage.path(f"{prefix}/cmp/compare.md").read_text()
    assert storage.path(f"{prefix}/cmp/compare.png").read_bytes()[:4] == b"\x89PNG"


def user_error(capsys, argv):
    """What the entry point does with `argv`: its exit code and stderr."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: eval_cli.main(argv))
    return e.value.code, capsys.readouterr().err


def test_missing_bucket_paths_are_one_line_errors_naming_them(model_dir, prefix, capsys):
    missing = f"{prefix}/nowhere/safety_pair.jsonl"
    code, err = user_error(capsys, ["--checkpoint", str(model_dir), "--tests", missing,
                                    "--out", f"{prefix}/o"])
    assert (code, err) == (2, f"error: {missing}: no such file\n")
    code, err = user_error(capsys, ["judge", "--answers", missing, "--tokenizer", str(model_dir),
                                    "--out", f"{prefix}/o"])
    assert (code, err) == (2, f"error: {missing}: no such file\n")
    code, err = user_error(capsys, ["judge", "--answers", missing, "--tokenizer", str(model_dir),
                                    "--judge", f"refusal:{prefix}/none.txt",
                                    "--out", f"{prefix}/o"])
    assert (code, err) == (2, f"error: {prefix}/none.txt: no such file\n")
    code, err = user_error(capsys, ["compare", f"{prefix}/nowhere", "--out", f"{prefix}/o"])
    assert code == 2 and err.startswith(f"error: {prefix}/nowhere: no report.json")
    assert not storage.path(f"{prefix}/o").exists()
