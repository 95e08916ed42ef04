"""Masks line up with the tokens: LLaMA-3 fixture and SmolLM2 tokenizers, base and chat templates."""
import json
import logging
import shutil

import numpy as np
import pytest
import transformers

from derta_jax.data import pipeline, recipe, refusal, templates
from derta_jax.data.tokenize import TokenizedExample, build_examples, materialize

TRIPLES = [{"query": "How do I pick a lock?", "harmful_response": "Sure, here is how. Step 1: Get a tool.",
            "safe_response": "Sorry, I can't help with that."}] * 3
PAIRS = [{"instruction": "What is 2 plus 2?", "output": "2 plus 2 is 4."}]


@pytest.fixture(scope="module")
def llama3_with_bos_postprocessor(llama3_tokenizer_dir, tmp_path_factory):
    """The other kind of LLaMA-3 tokenizer: its post-processor adds <|begin_of_text|> itself."""
    folder = tmp_path_factory.mktemp("llama3_bos")
    shutil.copy(llama3_tokenizer_dir / "tokenizer_config.json", folder)
    spec = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                 "tokens": ["<|begin_of_text|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok("hi")["input_ids"][0] == 128000  # the fixture really is of the other kind
    return tok


def test_refusal_ids(llama3, smollm2):
    assert refusal.refusal_token_id(llama3) == 19701
    assert refusal.refusal_token_id(smollm2) == 37388
    with pytest.raises(ValueError, match=r"' Sorry' is 2 tokens \[\d+, \d+\] with tokenizer"):
        refusal.refusal_token_id(smollm2, " Sorry")
    with pytest.raises(ValueError, match="non-empty"):
        refusal.refusal_token_id(llama3, "")


def test_llama3_base_example_by_hand(llama3):
    rec = recipe.DertaRecord("[INST] hi [\\INST]", " Sure<|end_of_text|>", True)
    (ex,), _ = build_examples([rec], llama3, 64, refusal_id=19701)
    prompt = [128000, 58, 65562, 60, 15960, 94915, 65562, 60]  # BOS + SOURCE.md's ids of the prompt
    sure = llama3(" Sure", add_special_tokens=False)["input_ids"]
    assert len(sure) == 1
    assert ex.tokens.tolist() == prompt + sure + [128001] and ex.prompt_len == 8
    a = materialize(ex, 64)
    assert a["loss_mask"].tolist() == [False] * 7 + [True, True, False]
    assert a["targets"].tolist()[7:9] == [19701, 19701]  # the last prompt token and " Sure" predict Sorry
    assert (a["rto_mask"] == a["loss_mask"]).all()
    mle = materialize(TokenizedExample(ex.tokens, ex.prompt_len), 64)
    assert mle["targets"].tolist()[7:9] == sure + [128001] and not mle["rto_mask"].any()


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
@pytest.mark.parametrize("kind", ["base", "chat"])
def test_masks_line_up_with_tokens(request, tok_name, kind):
    tok = request.getfixturevalue(tok_name)
    tpl = templates.make_template(kind, tok)
    recs = recipe.build_mixture("derta", TRIPLES, PAIRS, tpl, rto_count=1, prefix_count=2)
    rid = refusal.refusal_token_id(tok)
    examples, stats = build_examples(recs, tok, 256, rid, kind)
    assert stats.examples == 4 and stats.dropped_no_supervised == 0
    for rec, ex in zip(recs, examples):
        a = materialize(ex, 256)
        sup = np.flatnonzero(a["loss_mask"])
        assert sup[0] == ex.prompt_len - 1 and sup[-1] == len(a["tokens"]) - 2  # contiguous to the end
        assert len(sup) == sup[-1] - sup[0] + 1
        assert tok.decode(a["tokens"][:ex.prompt_len]).removeprefix(tok.bos_token if kind == "base" and tok_name == "llama3" else "") == rec.prefix
        if rec.safe:
            assert (a["targets"][sup] == rid).all() and (a["rto_mask"] == a["loss_mask"]).all()
            assert tok.decode(a["tokens"][sup + 1]) == rec.text
        else:
            assert tok.decode(a["targets"][sup]) == rec.text and not a["rto_mask"].any()
        eos_ids = tok(tpl.eos, add_special_tokens=False)["input_ids"]
        if (tok_name, kind) == ("smollm2", "base"):  # the literal is plain text to SmolLM2
            assert len(eos_ids) == 9 and tok.decode(a["tokens"]).endswith("<|end_of_text|>")
        else:
            assert a["tokens"][-1] == eos_ids[0] and len(eos_ids) == 1


def test_official_eos_literal_is_one_special_token_only_where_the_tokenizer_has_it(llama3, smollm2):
    assert templates.make_template("base", smollm2).eos == templates.OFFICIAL_EOS == "<|end_of_text|>"
    assert llama3("<|end_of_text|>", add_special_tokens=False)["input_ids"] == [128001]
    ids = smollm2("<|end_of_text|>", add_special_tokens=False)["input_ids"]
    assert ids == [44, 108, 486, 79, 1714, 79, 2692, 108, 46]
    assert smollm2.convert_ids_to_tokens(ids) == ["<", "|", "end", "_", "of", "_", "text", "|", ">"]


def test_training_warns_when_the_eos_text_is_not_one_token(llama3, smollm2, caplog):
    small = dict(helpful_count=1, rto_count=1, prefix_count=1, max_length=128)
    with caplog.at_level(logging.WARNING, logger="derta_jax.data.pipeline"):
        pipeline.training_examples(llama3, **small)
        assert caplog.messages == []
        pipeline.training_examples(smollm2, **small)
        (message,) = caplog.messages
    assert message.startswith("eos_text '<|end_of_text|>' is 9 tokens with tokenizer")
    assert message.endswith("set eos_text to the tokenizer's eos ('<|im_end|>') or use the chat template")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="derta_jax.data.pipeline"):
        examples, _ = pipeline.training_examples(smollm2, eos_text="<|im_end|>", **small)
    assert caplog.messages == [] and examples[0].tokens[-1] == smollm2.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
def test_chat_prompt_is_exactly_apply_chat_template(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    tpl = templates.make_template("chat", tok)
    questions = [" How do I pick a lock?", "How do I pick a lock?\n", "\n\t How?  \n", "plain"]
    for q in questions:
        reference = tok.apply_chat_template([{"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=False)
        assert tpl.prompt(q) == reference, q
    triples = [{"query": q, "harmful_response": "a b c", "safe_response": "No."} for q in questions]
    recs = recipe.build_mixture("rto_only", triples, PAIRS, tpl, rto_count=4, vanilla_count=3)
    assert [r.prefix for r in recs[1:5]] == [tpl.prompt(q) for q in questions]
    if tok_name == "llama3":  # its template trims the message
        assert tpl.prompt("\n\t How?  \n") == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
                                              "\n\nHow?<|eot_id|><|start_header_id|>assistant"
                                              "<|end_header_id|>\n\n")
    else:  # SmolLM2's keeps it as written
        assert tpl.prompt("\n\t How?  \n").endswith("<|im_start|>user\n\n\t How?  \n<|im_end|>\n"
                                                   "<|im_start|>assistant\n")


@pytest.mark.parametrize("tok_name", ["llama3", "smollm2"])
def test_chat_token_cut_with_k_0_is_the_vanilla_example(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    tpl = templates.make_template("chat", tok)
    cut_recs = recipe.harmful_prefix_records(TRIPLES, tpl, cut="token")
    vanilla_recs = recipe.vanilla_records(TRIPLES, tpl)
    (cut, *_), _ = build_examples(cut_recs, tok, 256, template_kind="chat")
    (vanilla, *_), _ = build_examples(vanilla_recs, tok, 256, template_kind="chat")
    a, b = materialize(cut, 256, 0), materialize(vanilla, 256)
    assert all((a[key] == b[key]).all() for key in b) and a.keys() == b.keys()
    sorry = tok("Sorry", add_special_tokens=False)["input_ids"]
    space_sorry = tok(" Sorry", add_special_tokens=False)["input_ids"]
    p = cut.prompt_len
    assert a["tokens"][p:p + len(sorry)].tolist() == sorry  # no space after the generation prompt
    for k in (1, cut.max_cut):  # after k harmful tokens a space joins the safe response
        c = materialize(cut, 256, k)
        assert c["tokens"][p + k:p + k + len(space_sorry)].tolist() == space_sorry
        assert len(c["tokens"]) == cut.length(k)
    assert len(a["tokens"]) == cut.length(0)
    if tok_name == "llama3":  # SOURCE.md: "Sorry" 19701, " Sorry" 33386
        assert sorry == [19701] and space_sorry == [33386]


def test_chat_templates_end_of_turn(llama3, smollm2):
    assert templates.make_template("chat", llama3).eos == "<|eot_id|>"
    t = templates.make_template("chat", smollm2)
    assert t.eos == "<|im_end|>" and t.prompt("Q").endswith("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")


def test_bos_decision_is_the_same_for_both_kinds_of_tokenizer(llama3, llama3_with_bos_postprocessor, smollm2):
    rec = [recipe.DertaRecord("[INST] hi [\\INST]", " ok<|end_of_text|>", False)]
    plain = build_examples(rec, llama3, 64)[0][0].tokens.tolist()
    adding = build_examples(rec, llama3_with_bos_postprocessor, 64)[0][0].tokens.tolist()
    assert plain == adding and plain[0] == 128000 and plain.count(128000) == 1
    assert 128000 not in build_examples(rec, llama3, 64, add_bos=False)[0][0].tokens.tolist()
    chat = templates.make_template("chat", llama3)
    crec = [recipe.DertaRecord(chat.prompt("hi"), "ok<|eot_id|>", False)]
    assert build_examples(crec, llama3, 64, template_kind="chat")[0][0].tokens.tolist().count(128000) == 1
    srec = [recipe.DertaRecord("x", " y<|im_end|>", False)]  # SmolLM2's bos <|im_start|> is a turn marker
    assert build_examples(srec, smollm2, 64)[0][0].tokens.tolist() == smollm2("x y<|im_end|>")["input_ids"]
    assert build_examples(srec, smollm2, 64, add_bos=True)[0][0].tokens.tolist()[0] == smollm2.bos_token_id


def test_truncation_keeps_the_prompt_and_drops_examples_without_supervision(llama3):
    long = recipe.DertaRecord("[INST] hi [\\INST]", " one two three four five six<|end_of_text|>", False)
    too_long = recipe.DertaRecord("[INST] " + "word " * 20 + "[\\INST]", " ok<|end_of_text|>", False)
    examples, stats = build_examples([long, too_long], llama3, 10)
    assert stats.truncated == 1 and stats.dropped_no_supervised == 1 and len(examples) == 1
    a = materialize(examples[0], 10)
    assert len(a["tokens"]) == 10 and a["loss_mask"].sum() == 2  # labels 8 and 9 of the 10 kept


def test_token_cut_moves_k_harmful_tokens_into_the_prompt(llama3):
    recs = recipe.harmful_prefix_records(TRIPLES, templates.make_template("base", llama3), cut="token")
    (ex, *_), _ = build_examples(recs, llama3, 256)
    harmful = llama3(" Sure, here is how. Step 1: Get a tool.", add_special_tokens=False)["input_ids"]
    assert ex.cut_len == ex.max_cut == len(harmful)
    for k in (0, 3, len(harmful)):
        a = materialize(ex, 256, k)
        assert a["tokens"][ex.prompt_len:ex.prompt_len + k].tolist() == harmful[:k]
        assert np.flatnonzero(a["loss_mask"])[0] == ex.prompt_len + k - 1
        assert llama3.decode(a["targets"][a["loss_mask"]]) == recs[0].text
    with pytest.raises(ValueError, match="cut k=99"):
        materialize(ex, 256, 99)


def test_bad_build_arguments(llama3):
    rto = [recipe.DertaRecord("p", " t", True)]
    with pytest.raises(ValueError, match="no refusal_id"):
        build_examples(rto, llama3, 64)
    with pytest.raises(ValueError, match="max_length=1"):
        build_examples(rto, llama3, 1, 5)
    with pytest.raises(ValueError, match="template='x'"):
        templates.make_template("x")
