"""Multi-turn chats (`messages`): loss on assistant turns only, checked by hand for LLaMA-3 and SmolLM2."""
import json

import datasets
import pytest

from derta_jax.data import pipeline, records, recipe, templates
from derta_jax.data.tokenize import build_examples, materialize

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How do I pick a lock?"}]
HARMFUL, SAFE = "Sure, here is how. Step 1: Get a tool.", "Sorry, I can't help with that."
# The prompt of the last assistant turn, written by hand from each model's chat template.
PROMPT = {
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHow do I pick a lock?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "smollm2": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow do I pick a lock?<|im_end|>\n"
               "<|im_start|>assistant\n",
}
EOT = {"llama3": "<|eot_id|>", "smollm2": "<|im_end|>"}


def _triples(tmp_path):
    path = tmp_path / "safety.jsonl"
    row = {"messages": CHAT, "harmful_response": HARMFUL, "safe_response": SAFE}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    return records.read_rows(path, "safety")[0]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
def test_multi_turn_safety_masks_by_hand(request, tmp_path, tok_name):
    tok, eot = request.getfixturevalue(tok_name), EOT[tok_name]
    triples = _triples(tmp_path)
    assert triples[0]["id"].endswith("safety.jsonl:1") and triples[0]["messages"] == CHAT
    recs = recipe.build_mixture("derta", triples, [], templates.make_template("chat", tok), seed=0,
                                rto_count=1, prefix_count=2)
    rto, _, prefix = recs  # the second triple (index 1) gets a harmful prefix of i >= 1 words
    words = prefix.prefix.removeprefix(PROMPT[tok_name])
    assert rto.prefix == PROMPT[tok_name] and words and HARMFUL.startswith(words)
    (ex_rto, _, ex_prefix), _ = build_examples(recs, tok, 512, refusal_id=tok.convert_tokens_to_ids("Sorry"),
                                               template_kind="chat")
    earlier = _ids(tok, "Hello!" + eot)  # the earlier assistant turn with its end-of-turn token
    a = materialize(ex_prefix, 512)
    assert tok.decode(a["tokens"]) == PROMPT[tok_name] + words + " " + SAFE + eot
    assert a["targets"][a["loss_mask"]].tolist() == earlier + _ids(tok, " " + SAFE + eot)
    assert not a["rto_mask"].any() and a["targets"][a["loss_mask"]][-1] == tok.convert_tokens_to_ids(eot)
    r = materialize(ex_rto, 512)
    assert r["targets"][r["loss_mask"] & ~r["rto_mask"]].tolist() == earlier  # MLE, not RTO
    assert (r["targets"][r["rto_mask"]] == tok.convert_tokens_to_ids("Sorry")).all()
    assert r["rto_mask"].sum() == len(_ids(tok, HARMFUL + eot)) and not r["rto_mask"][:ex_rto.prompt_len - 1].any()
    if tok_name == "llama3":  # exactly one BOS: the one the template writes
        assert a["tokens"][0] == tok.bos_token_id and (a["tokens"] == tok.bos_token_id).sum() == 1
    else:  # SmolLM2's bos <|im_start|> is its turn marker: one per turn, none added
        assert (a["tokens"] == tok.bos_token_id).sum() == 5


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
def test_multi_turn_helpful_all_or_last_turns(request, tmp_path, tok_name):
    tok, eot = request.getfixturevalue(tok_name), EOT[tok_name]
    path = tmp_path / "helpful.jsonl"
    path.write_text(json.dumps({"messages": CHAT + [{"role": "assistant", "content": "Call a locksmith."}]}) + "\n")
    for turns, want in [("all", "Hello!" + eot), ("last", "")]:
        (ex,), _ = pipeline.training_examples(tok, "derta", safety=pipeline.DEMO_SAFETY, helpful=path,
                                              template="chat", assistant_turns=turns, max_length=512,
                                              rto_count=0, prefix_count=0)
        a = materialize(ex, 512)
        assert tok.decode(a["tokens"]) == PROMPT[tok_name] + "Call a locksmith." + eot
        assert a["targets"][a["loss_mask"]].tolist() == _ids(tok, want) + _ids(tok, "Call a locksmith." + eot)


def test_one_turn_chat_equals_the_flat_row(llama3, tmp_path):
    path = tmp_path / "safety.jsonl"
    flat = {"query": "How?", "harmful_response": HARMFUL, "safe_response": SAFE}
    chat = {"messages": [{"role": "user", "content": "How?"}], "harmful_response": HARMFUL, "safe_response": SAFE}
    path.write_text("\n".join(json.dumps(r) for r in [flat, chat] * 2) + "\n")
    recs = recipe.build_mixture("rto_only", records.read_rows(path, "safety")[0], [],
                                templates.make_template("chat", llama3), rto_count=4, vanilla_count=2)
    assert recs[0] == recs[1] and recs[4] == recs[5] and recs[0].turns == ()


def test_empty_assistant_mask_stops_with_the_example_and_its_text(llama3, tmp_path):
    tok = llama3.__class__.from_pretrained(llama3.name_or_path)
    # a broken template: it writes an assistant turn's content only as the second message
    tok.chat_template = tok.chat_template.replace(
        "message['content'] | trim", "(message['content'] if message['role'] != 'assistant' or loop.index0 == 1 else '')")
    triples = _triples(tmp_path)
    with pytest.raises(ValueError, match=r"safety\.jsonl:1: message 2 \(assistant\) renders empty, so its "
                                         r"loss mask is empty: '<\|begin_of_text\|>.*assistant<\|end_header_id\|>"
                                         r"\\n\\n<\|eot_id\|>"):
        recipe.build_mixture("derta", triples, [], templates.make_template("chat", tok), rto_count=1,
                             prefix_count=1)


@pytest.mark.parametrize("row,reason", [
    ({"messages": CHAT[:3], "harmful_response": "h", "safe_response": "s"},
     r"a safety chat ends with user turns \(harmful_response, safe_response answer it\)"),
    ({"messages": [{"role": "tool", "content": "x"}], "harmful_response": "h", "safe_response": "s"},
     r"message 0 is not \{role: system \| user \| assistant, content: string\}"),
    ({"messages": CHAT, "harmful_response": "h"}, "missing field 'safe_response'"),
    ({"messages": [], "harmful_response": "h", "safe_response": "s"}, "field .messages. is list, expected a non-empty list"),
])
def test_bad_chat_rows_name_the_line(tmp_path, row, reason):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"s\.jsonl:1: {reason}"):
        records.read_rows(path, "safety")


def test_chat_dataset_with_a_mapped_messages_column(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.Dataset.from_list([{"conversation": CHAT + [{"role": "assistant", "content": "Ok."}]}]).to_parquet(
        tmp_path / "h.parquet")
    rows, _ = records.read_rows(records.Source(str(tmp_path / "h.parquet"), columns="messages=conversation"),
                                "helpful")
    assert rows == [{"messages": CHAT, "output": "Ok.", "id": f"{tmp_path / 'h.parquet'}: row 0"}]
