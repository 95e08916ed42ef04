"""python -m derta_jax.eval end to end on a tiny random model: files, report, resume, compare."""
import json

import jax
import pytest
from transformers import AutoTokenizer

from derta_jax import eval as eval_cli
from derta_jax.checkpoints.model_dir import save_model_dir
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import init_variables

pytest.importorskip("derta_jax.evaluation.generation")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama3_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=512, eos_token_ids=(128001,))
    params = init_variables(cfg, jax.random.key(1))["params"]
    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny", cfg, params, tokenizer)


@pytest.fixture(scope="module")
def test_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tests")
    sets = {
        "safety_completionattack.jsonl": [{"question": f"Step {i}: first, get"} for i in range(3)],
        "helpfulness_gsm8k.jsonl": [{"question": "What is 2+2?", "answer": "#### 4"}],
        "helpfulness_alpacaeval.jsonl": [{"question": "Write a haiku."}],
    }
    for name, rows in sets.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ",".join(str(d / n) for n in sets)


def run(model_dir, test_files, out, *extra):
    return eval_cli.main(["--checkpoint", str(model_dir), "--tests", test_files, "--out", str(out),
                          "--max-new-tokens", "5", "--batch-size", "2", "--no-progress", *extra])


def test_eval_writes_answers_and_report_and_resumes(model_dir, test_files, tmp_path):
    rep = run(model_dir, test_files, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "completionattack.jsonl").open()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) >= {"question", "prompt", "response", "num_tokens", "finish_reason", "judges"}
        assert r["prompt"] == r["question"] and 0 < r["num_tokens"] <= 5
        assert r["finish_reason"] in ("stop", "length") and "refusal" in r["judges"]
    gsm, = [json.loads(line) for line in (tmp_path / "out" / "gsm8k.jsonl").open()]
    assert gsm["prompt"] == "[INST] \nWhat is 2+2?\n\n [\\INST]" and "correct" in gsm["score"]
    alpaca = json.loads((tmp_path / "out" / "alpacaeval_outputs.json").read_text())
    assert alpaca[0]["instruction"] == "Write a haiku." and alpaca[0]["generator"] == "tiny"
    assert set(rep["table"]) == {"Comp", "GSM8K", "Alpaca"}
    for f in ("report.json", "report.md", "report.png", "run.json"):
        assert (tmp_path / "out" / f).exists()
    # Re-run: nothing answered again, same report.
    again = run(model_dir, test_files, tmp_path / "out")
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert all(s["answered_now"] == 0 for s in run_json["sets"].values())
    assert again["table"] == rep["table"]
    # Other decoding settings into the same out dir: refused.
    with pytest.raises(ValueError, match="max_new_tokens"):
        eval_cli.main(["--checkpoint", str(model_dir), "--tests", test_files, "--out",
                       str(tmp_path / "out"), "--max-new-tokens", "6", "--no-progress"])
    # compare: two runs side by side.
    run(model_dir, test_files, tmp_path / "out2", "--limit", "1")
    reports = eval_cli.main(["compare", str(tmp_path / "out"), str(tmp_path / "out2"),
                             "--out", str(tmp_path / "cmp")])
    assert len(reports) == 2 and (tmp_path / "cmp" / "compare.png").exists()


def test_cli_errors(model_dir, test_files, tmp_path):
    with pytest.raises(ValueError, match="is not a derta_jax checkpoint"):
        eval_cli.main(["--checkpoint", str(tmp_path), "--tests", test_files, "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--kind has 2 entries for 3"):
        eval_cli.main(["--checkpoint", str(model_dir), "--tests", test_files, "--out",
                       str(tmp_path / "o"), "--kind", "safety,gsm8k"])
    with pytest.raises(ValueError, match="--max-new-tokens must be >= 1"):
        eval_cli.main(["--checkpoint", str(model_dir), "--tests", test_files, "--out",
                       str(tmp_path / "o"), "--max-new-tokens", "0"])
