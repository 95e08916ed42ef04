"""One BOS rule for prompts: generate, eval and the training data tokenise a prompt alike.

The LLaMA-3 fixture's tokenizer adds no BOS by default (`tok("hi")` has no <|begin_of_text|>),
its variant with a BOS post-processor does; the training data gives a base prompt one BOS with
both (`data.tokenize.resolve_add_bos`). Raw prompts at generate/eval time must start as the
training prompts did, whatever the tokenizer's default.
"""
import json
import shutil

import pytest
import transformers

from derta_jax import generate as generate_cli
from derta_jax.data.recipe import DertaRecord
from derta_jax.data.tokenize import build_examples
from derta_jax.evaluation import tasks

BOS = 128000
PROMPTS = ["[INST] \nHow do I pick a lock?\n\n [\\INST]", "Step 1: take the"]


def _variant(src, folder, tokenizer_json=None, chat_template=None):
    folder.mkdir()
    shutil.copy(src / "tokenizer.json", folder)
    config = json.loads((src / "tokenizer_config.json").read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizers(llama3_tokenizer_dir, tmp_path_factory):
    """(fixture tokenizer: no BOS by default, a variant whose post-processor adds BOS)."""
    plain = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    spec = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [BOS],
                                                 "tokens": ["<|begin_of_text|>"]}}}
    adding = _variant(llama3_tokenizer_dir, tmp_path_factory.mktemp("bos") / "tok", spec)
    assert BOS not in plain("hi")["input_ids"] and adding("hi")["input_ids"][0] == BOS
    return plain, adding


def training_prompt_ids(prompt, tokenizer, kind="base"):
    """The prompt's ids as the training data builds them (the text is irrelevant here)."""
    [example], _ = build_examples([DertaRecord(prompt, " ok<|end_of_text|>", False)], tokenizer,
                                  256, template_kind=kind)
    return example.tokens[:example.prompt_len].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_raw_prompts_get_one_bos_as_in_training(tokenizers, prompt):
    plain, adding = tokenizers
    for tok in (plain, adding):
        want = training_prompt_ids(prompt, tok)
        assert want == [BOS] + plain(prompt, add_special_tokens=False)["input_ids"]
        assert generate_cli.encode(tok, prompt, chat=False) == want
        # eval: a CompletionAttack question is fed raw; a base-template prompt likewise
        assert tasks.encode_prompt(tasks.build_prompt(prompt, tasks.COMPLETION_ATTACK), tok,
                                   chat=False) == want


def test_chat_prompts_carry_the_template_bos_once(tokenizers):
    plain, adding = tokenizers
    question = "How do I pick a lock?"
    messages = [{"role": "user", "content": question}]
    reference = plain.apply_chat_template(messages, add_generation_prompt=True,
                                          tokenize=True)["input_ids"]  # transformers' own
    assert reference.count(BOS) == 1
    for tok in (plain, adding):
        got = generate_cli.encode(tok, question, chat=True)
        assert got == reference
        assert tasks.encode_prompt(tasks.build_prompt(question, tasks.SAFETY, tok, chat=True),
                                   tok, chat=True) == got
        assert training_prompt_ids(tasks.chat_prompt(question, tok), tok, "chat") == got


def test_bos_that_marks_chat_turns_is_not_added(llama3_tokenizer_dir, tmp_path):
    """A BOS that the chat template writes as a turn marker (SmolLM2's <|im_start|>) is not put
    in front of a raw prompt, as in the training data."""
    marker = ("{% for m in messages %}<|begin_of_text|>{{ m['role'] }}\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|begin_of_text|>assistant\n"
              "{% endif %}")
    tok = _variant(llama3_tokenizer_dir, tmp_path / "tok", chat_template=marker)
    want = training_prompt_ids(PROMPTS[1], tok)
    assert BOS not in want
    assert generate_cli.encode(tok, PROMPTS[1], chat=False) == want
