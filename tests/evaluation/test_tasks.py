"""Test-set kinds, JSON-lines reading, prompt building."""
import json

import pytest
from transformers import AutoTokenizer

from derta_jax.evaluation import tasks
from derta_jax.models.config import preset


@pytest.mark.parametrize("name, kind, set_name", [
    ("demo/eval/safety_completionattack.jsonl", "completionattack", "completionattack"),
    ("safety_harmful_questions.jsonl", "safety", "harmful_questions"),
    ("data/safety_pair.json", "safety", "pair"),
    ("helpfulness_gsm8k.jsonl", "gsm8k", "gsm8k"),
    ("helpfulness_mmlu.jsonl", "mmlu", "mmlu"),
    ("demo/eval/helpfulness_arithmetic.jsonl", "gsm8k", "arithmetic"),
    ("helpfulness_alpacaeval.jsonl", "alpacaeval", "alpacaeval"),
    ("demo/eval/helpfulness_overrefusal.jsonl", "overrefusal", "overrefusal"),
    ("demo/eval/helpfulness_howto.jsonl", "overrefusal", "howto"),
])
def test_kind_from_file_name(name, kind, set_name):
    assert tasks.infer_kind(name) == kind
    assert tasks.set_name(name) == set_name


def test_kind_flag_and_errors():
    assert tasks.infer_kind("my_attack.jsonl", "completionattack") == "completionattack"
    with pytest.raises(ValueError, match="my_attack.jsonl.*--kind"):
        tasks.infer_kind("my_attack.jsonl")
    with pytest.raises(ValueError, match="helpfulness_trivia"):
        tasks.infer_kind("helpfulness_trivia.jsonl")
    with pytest.raises(ValueError, match="'poetry'"):
        tasks.infer_kind("x.jsonl", "poetry")


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "helpfulness_gsm8k.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"helpfulness_gsm8k.jsonl:3: invalid JSON"):
        tasks.load_test_set(path)
    path.write_text(json.dumps({"question": "1+1?"}) + "\n")
    with pytest.raises(ValueError, match=r":1: missing string field 'answer'"):
        tasks.load_test_set(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r":1: expected a JSON object"):
        tasks.load_test_set(path)


def test_load_with_limit(tmp_path):
    path = tmp_path / "safety_pair.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(5)))
    ts = tasks.load_test_set(path, limit=2)
    assert (ts.name, ts.kind, ts.is_safety) == ("pair", "safety", True)
    assert [e["question"] for e in ts.examples] == ["q0", "q1"]


def test_base_prompts():
    assert tasks.build_prompt("How?", "safety") == "[INST] \nHow?\n\n [\\INST]"
    assert tasks.build_prompt("How?", "gsm8k") == "[INST] \nHow?\n\n [\\INST]"
    assert tasks.build_prompt("Step 1: buy", "completionattack") == "Step 1: buy"


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


def test_chat_prompts(tokenizer):
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assistant = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tasks.build_prompt("How?", "safety", tokenizer, chat=True) == (
        head + "How?<|eot_id|>" + assistant)
    # CompletionAttack: a pre-filled assistant turn that stays open (no <|eot_id|> after it).
    assert tasks.build_prompt("Step 1: buy", "completionattack", tokenizer, chat=True) == (
        head + "<|eot_id|>" + assistant + "Step 1: buy")
    ids = tasks.encode_prompt(head + "Hi<|eot_id|>", tokenizer, chat=True)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    ids = tasks.encode_prompt("[INST] \nHi\n\n [\\INST]", tokenizer, chat=False)
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("[")]


def test_chat_needs_template(tokenizer):
    class NoTemplate:
        chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tasks.build_prompt("How?", "safety", NoTemplate(), chat=True)


def test_stop_ids(tokenizer):
    cfg = preset("llama3-8b")
    assert set(tasks.stop_ids(cfg, tokenizer)) == {128001, 128009}
