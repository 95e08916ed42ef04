"""Answering a test set with a scripted generator: rows, judges, scores, and resume."""
import dataclasses
import json

import pytest
from transformers import AutoTokenizer

from derta_jax.evaluation import judges, runner, tasks
from derta_jax.evaluation.loading import EvalModel
from derta_jax.models.config import preset


@dataclasses.dataclass
class Gen:
    token_ids: list
    finish_reason: str


class ScriptedGenerate:
    """Answers prompt k with the k-th scripted text and records what it was asked."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, list(texts), []

    def __call__(self, params, cfg, prompt_ids, **kw):
        self.calls.append((prompt_ids, kw))
        out = []
        for _ in prompt_ids:
            ids = self.tokenizer(self.texts.pop(0), add_special_tokens=False)["input_ids"]
            out.append(Gen(ids, "stop"))  # as generate: the stop token excluded
        return out


@pytest.fixture(scope="module")
def model(llama3_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    return EvalModel("m", preset("llama3-8b"), params=None, tokenizer=tokenizer)


def write_set(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tasks.load_test_set(path)


def test_rows_carry_prompt_response_and_verdicts(tmp_path, model):
    ts = write_set(tmp_path, "safety_completionattack.jsonl",
                   [{"question": "To build it, first"}, {"question": "Step 1:"}])
    gen = ScriptedGenerate(model.tokenizer, [" take the two parts apart. Sorry, I cannot", " Sorry, no."])
    rows = runner.run_set(ts, model, tmp_path / "out", [judges.RefusalJudge(model.tokenizer)],
                          runner.DecodeOptions(max_new_tokens=7, batch_size=4),
                          generate_fn=gen, progress=False)
    (prompt_ids, kw), = gen.calls
    # Fed raw, after the BOS that the base-template training data also starts with.
    assert prompt_ids[0] == [128000] + model.tokenizer("To build it, first",
                                                       add_special_tokens=False)["input_ids"]
    assert kw["max_new_tokens"] == 7 and kw["temperature"] == 0.0 and 128001 in kw["stop_ids"]
    assert rows[0]["prompt"] == "To build it, first"  # CompletionAttack is fed raw
    assert rows[0]["response"] == " take the two parts apart. Sorry, I cannot"
    assert rows[0]["num_tokens"] == 10 and rows[0]["finish_reason"] == "stop"
    v0, v1 = (r["judges"]["refusal"] for r in rows)
    assert v0["refused"] and not v0["refused_first5"] and v0["refusal_position"] == 7
    assert v1["refused_first5"] and v1["refusal_position"] == 1
    on_disk = [json.loads(line) for line in (tmp_path / "out" / "completionattack.jsonl").open()]
    assert on_disk == rows


def test_gsm8k_rows_are_scored_not_judged(tmp_path, model):
    ts = write_set(tmp_path, "helpfulness_gsm8k.jsonl",
                   [{"question": "2+2?", "answer": "#### 4"}, {"question": "3+3?", "answer": "#### 6"}])
    gen = ScriptedGenerate(model.tokenizer, ["2+2 = 4.", "Sorry, I cannot count."])
    rows = runner.run_set(ts, model, tmp_path, [judges.RefusalJudge(model.tokenizer)],
                          generate_fn=gen, progress=False)
    assert [r["score"] for r in rows] == [{"prediction": "4", "correct": True},
                                          {"prediction": None, "correct": False}]
    # The official GSM8K rewrite ("\n {q} \n ") inside the template.
    assert rows[0]["prompt"] == "[INST] \n\n 2+2? \n \n\n [\\INST]" and rows[0]["judges"] == {}


def test_resume_after_a_half_written_line(tmp_path, model):
    ts = write_set(tmp_path, "safety_pair.jsonl", [{"question": f"q{i}"} for i in range(5)])
    refusal = judges.RefusalJudge(model.tokenizer)
    options = runner.DecodeOptions(batch_size=2)
    first = runner.run_set(ts, model, tmp_path, [refusal], options, progress=False,
                           generate_fn=ScriptedGenerate(model.tokenizer, [f"a{i}" for i in range(5)]))
    out = tmp_path / "pair.jsonl"
    lines = out.read_text().splitlines(keepends=True)
    # Killed while writing row 3: rows 0-2 complete, half of row 3, nothing of row 4.
    out.write_text("".join(lines[:3]) + lines[3][:25])
    gen = ScriptedGenerate(model.tokenizer, ["b3", "b4"])
    rows = runner.run_set(ts, model, tmp_path, [refusal], options, generate_fn=gen, progress=False)
    assert [len(p) for p, _ in gen.calls] == [2]  # only rows 3 and 4 were generated again
    assert [r["response"] for r in rows] == ["a0", "a1", "a2", "b3", "b4"]
    assert [json.loads(line) for line in out.open()] == rows
    assert rows[:3] == first[:3]
    # Complete: a third run generates nothing.
    gen = ScriptedGenerate(model.tokenizer, [])
    assert runner.run_set(ts, model, tmp_path, [refusal], options, generate_fn=gen,
                          progress=False) == rows and gen.calls == []


def test_new_judge_on_resume_does_not_regenerate(tmp_path, model):
    ts = write_set(tmp_path, "safety_pair.jsonl", [{"question": "q"}])
    runner.run_set(ts, model, tmp_path, [], generate_fn=ScriptedGenerate(model.tokenizer, ["Sorry"]),
                   progress=False)
    gen = ScriptedGenerate(model.tokenizer, [])
    rows = runner.run_set(ts, model, tmp_path, [judges.RefusalJudge(model.tokenizer)],
                          generate_fn=gen, progress=False)
    assert gen.calls == [] and rows[0]["judges"]["refusal"]["refused"]
    assert json.loads((tmp_path / "pair.jsonl").read_text())["judges"]["refusal"]["refused"]


def test_verdict_of_another_rule_is_judged_again_without_regenerating(tmp_path, model):
    ts = write_set(tmp_path, "safety_pair.jsonl", [{"question": "q"}])
    # A row written before the paper rule: its refusal verdict has no "rule".
    old = {"index": 0, "set": "pair", "kind": "safety", "question": "q", "prompt": "p",
           "response": "", "num_tokens": 0, "finish_reason": "stop",
           "judges": {"refusal": {"harmful": True, "refused": False}}}
    (tmp_path / "pair.jsonl").write_text(json.dumps(old) + "\n")
    gen = ScriptedGenerate(model.tokenizer, [])
    rows = runner.run_set(ts, model, tmp_path, [judges.RefusalJudge(model.tokenizer)],
                          generate_fn=gen, progress=False)
    verdict = rows[0]["judges"]["refusal"]
    assert gen.calls == [] and verdict["rule"] == "paper"
    assert verdict["empty"] and not verdict["harmful"]  # the empty answer is not harmful now


def test_corrupt_row_and_other_test_file_are_errors(tmp_path, model):
    ts = write_set(tmp_path, "safety_pair.jsonl", [{"question": "q0"}, {"question": "q1"}])
    (tmp_path / "pair.jsonl").write_text('{"index": 0, "question": "q0"\n{"index": 1}\n')
    with pytest.raises(ValueError, match=r"pair.jsonl:1: corrupt"):
        runner.run_set(ts, model, tmp_path, [], generate_fn=None, progress=False)
    (tmp_path / "pair.jsonl").write_text(json.dumps({"index": 1, "question": "other", "judges": {}}) + "\n")
    with pytest.raises(ValueError, match="another question"):
        runner.run_set(ts, model, tmp_path, [], generate_fn=None, progress=False)
