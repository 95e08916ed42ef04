"""Test-set kinds and names, reading JSON lines and JSON arrays, prompt building."""
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
    # The official test files, and cuts of them a user makes.
    ("data/helpfulness_alpaca_eval_300.json", "alpacaeval", "alpacaeval"),
    ("helpfulness_alpaca_eval_40.json", "alpacaeval", "alpacaeval"),
    ("helpfulness_alpaca_eval_40.jsonl", "alpacaeval", "alpacaeval"),
    ("helpfulness_gsm8k_500.json", "gsm8k", "gsm8k"),
    ("helpfulness_mmlu_500.json", "mmlu", "mmlu"),
    ("helpfulness_mmlu_20.jsonl", "mmlu", "mmlu"),
    ("safety_completionattack.json", "completionattack", "completionattack"),
    ("safety_codeattack.json", "safety", "codeattack"),
    ("safety_jailbreakchat.json", "safety", "jailbreakchat"),
    ("safety_selfcipher.json", "safety", "selfcipher"),
    ("safety_autodan.json", "safety", "autodan"),
    ("safety_pair_10.jsonl", "safety", "pair"),
])
def test_kind_and_set_name_from_file_name(name, kind, set_name):
    assert tasks.infer_kind(name) == kind
    assert tasks.set_name(name) == set_name


@pytest.mark.parametrize("name, kind", [
    ("out/completionattack.jsonl", "completionattack"),  # eval's output: <set name>.jsonl
    ("out/pair.jsonl", "safety"),
    ("out/harmful_questions.jsonl", "safety"),
    ("out/gsm8k.jsonl", "gsm8k"),
    ("out/alpacaeval.jsonl", "alpacaeval"),
    ("out/howto.jsonl", "overrefusal"),
    ("answers/safety_autodan.jsonl", "safety"),  # a test file's name works too
])
def test_kind_of_answers_from_file_name(name, kind):
    assert tasks.answers_kind(name) == kind


def test_answers_of_unknown_name_need_kind():
    with pytest.raises(ValueError, match="mine.jsonl.*--kind"):
        tasks.answers_kind("mine.jsonl")


def test_kind_flag_overrides_the_name_and_unknown_names_are_errors():
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


def test_non_utf8_test_file_names_file_and_line(tmp_path):
    path = tmp_path / "safety_pair.jsonl"
    path.write_bytes(b'{"question": "q"}\n\n{"question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"safety_pair\.jsonl:3: not UTF-8 text \(byte 0xe9\)"):
        tasks.load_test_set(path)


def test_json_array_files_are_read_with_line_numbers(tmp_path):
    path = tmp_path / "helpfulness_gsm8k_2.json"  # the official files: one JSON array
    path.write_text('[\n  {"question": "1+1?", "answer": "#### 2"},\n  {"question": "2+2?",\n'
                    '   "answer": "#### 4"}\n]\n')
    ts = tasks.load_test_set(path)
    assert (ts.name, ts.kind) == ("gsm8k", "gsm8k")
    assert [e["question"] for e in ts.examples] == ["1+1?", "2+2?"]
    path.write_text('[\n  {"question": "1+1?", "answer": "#### 2"},\n  {"question": "2+2?"}\n]')
    with pytest.raises(ValueError, match=r"helpfulness_gsm8k_2.json:3: missing string field 'answer'"):
        tasks.load_test_set(path)
    path.write_text('[\n  {"question": "1+1?", "answer": "#### 2"},\n  {"question": oops}\n]')
    with pytest.raises(ValueError, match=r"helpfulness_gsm8k_2.json:3: invalid JSON"):
        tasks.load_test_set(path)
    # The element after the first one, on line 2, lacks its comma.
    path.write_text('[{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}]')
    with pytest.raises(ValueError, match=r"_2.json:2: invalid JSON \(expected ',' or ']'\)"):
        tasks.load_test_set(path)
    path.write_text('[{"question": "1+1?", "answer": "#### 2"}]\n[]')
    with pytest.raises(ValueError, match=r"_2.json:1: invalid JSON \(text after the array\)"):
        tasks.load_test_set(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="no examples"):
        tasks.load_test_set(path)


def test_two_files_of_one_set_are_an_error():
    tasks.check_distinct_sets([("gsm8k", "a/helpfulness_gsm8k_500.json"), ("pair", "safety_pair.json")])
    with pytest.raises(ValueError, match="helpfulness_gsm8k_500.json and b/helpfulness_gsm8k_40.json "
                                         "are both set 'gsm8k'"):
        tasks.check_distinct_sets([("gsm8k", "a/helpfulness_gsm8k_500.json"),
                                   ("gsm8k", "b/helpfulness_gsm8k_40.json")])


def test_limit_keeps_the_first_examples(tmp_path):
    path = tmp_path / "safety_pair.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(5)))
    ts = tasks.load_test_set(path, limit=2)
    assert (ts.name, ts.kind, ts.is_safety) == ("pair", "safety", True)
    assert [e["question"] for e in ts.examples] == ["q0", "q1"]


MMLU_Q = "Which gas do plants take in?\nA. Oxygen\nB. Carbon dioxide\nC. Helium\nD. Neon"


def test_base_prompts_are_the_official_evaluation_prompts():
    # Written out by hand from the official evaluation.py: "[INST] \n{question}\n\n [\INST]" with
    # MMLU and GSM8K questions rewritten first; CompletionAttack fed raw.
    assert tasks.build_prompt("How?", "safety") == "[INST] \nHow?\n\n [\\INST]"
    assert tasks.build_prompt("What is 2+2?", "gsm8k") == "[INST] \n\n What is 2+2? \n \n\n [\\INST]"
    assert tasks.build_prompt(MMLU_Q, "mmlu") == (
        "[INST] \nChoose the correct option for the given question.\n\n\n\nQuestion: Which gas do "
        "plants take in?\nA. Oxygen\nB. Carbon dioxide\nC. Helium\nD. Neon\n\n\n [\\INST]")
    assert tasks.build_prompt("Write a haiku.", "alpacaeval") == "[INST] \nWrite a haiku.\n\n [\\INST]"
    assert tasks.build_prompt("Step 1: buy", "completionattack") == "Step 1: buy"


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


def test_chat_prompts_put_the_question_in_the_user_turn(tokenizer):
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assistant = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tasks.build_prompt("How?", "safety", tokenizer, chat=True) == (
        head + "How?<|eot_id|>" + assistant)
    # CompletionAttack: a pre-filled assistant turn that stays open (no <|eot_id|> after it).
    assert tasks.build_prompt("Step 1: buy", "completionattack", tokenizer, chat=True) == (
        head + "<|eot_id|>" + assistant + "Step 1: buy")
    # The rewritten question is the user message; LLaMA-3's template trims it.
    assert tasks.build_prompt("What is 2+2?", "gsm8k", tokenizer, chat=True) == (
        head + "What is 2+2?<|eot_id|>" + assistant)
    assert tasks.build_prompt(MMLU_Q, "mmlu", tokenizer, chat=True) == (
        head + "Choose the correct option for the given question.\n\n\n\nQuestion: Which gas do "
        "plants take in?\nA. Oxygen\nB. Carbon dioxide\nC. Helium\nD. Neon<|eot_id|>" + assistant)
    ids = tasks.encode_prompt(head + "Hi<|eot_id|>", tokenizer, chat=True)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    ids = tasks.encode_prompt("[INST] \nHi\n\n [\\INST]", tokenizer, chat=False)
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("[")]


def test_chat_needs_template(tokenizer):
    class NoTemplate:
        chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tasks.build_prompt("How?", "safety", NoTemplate(), chat=True)


def test_stop_ids_are_eos_and_end_of_turn_tokens(tokenizer):
    cfg = preset("llama3-8b")
    assert set(tasks.stop_ids(cfg, tokenizer)) == {128001, 128009}
