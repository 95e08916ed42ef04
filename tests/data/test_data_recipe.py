"""The official recipe on hand-written triples, against records written by hand from the rules."""
import logging
import random

import pytest

from derta_jax.data import recipe
from derta_jax.data.recipe import DertaRecord
from derta_jax.data.templates import Template, base_template

E = "<|end_of_text|>"
TRIPLES = [  # index % 3 == 0 -> no harmful prefix; < 3 words -> skipped for the prefix recipe
    {"query": "Q0", "harmful_response": "a b c d", "safe_response": "No0."},
    {"query": "Q1", "harmful_response": "x y", "safe_response": "No1."},
    {"query": "Q2", "harmful_response": "one two three", "safe_response": "No2."},
    {"query": "Q3", "harmful_response": "p q r", "safe_response": "No3."},
    {"query": "Q4", "harmful_response": "u v w", "safe_response": "No4."},
]
PAIRS = [{"instruction": "I0", "output": "O0"}, {"instruction": "I1", "output": "O1"}]
H = [DertaRecord("[INST] I0 [\\INST]", " O0" + E, False), DertaRecord("[INST] I1 [\\INST]", " O1" + E, False)]
RTO = [DertaRecord("[INST] Q0 [\\INST]", " a b c d" + E, True),
       DertaRecord("[INST] Q1 [\\INST]", " x y" + E, True),
       DertaRecord("[INST] Q2 [\\INST]", " one two three" + E, True),
       DertaRecord("[INST] Q3 [\\INST]", " p q r" + E, True),
       DertaRecord("[INST] Q4 [\\INST]", " u v w" + E, True)]
PREFIX = [DertaRecord("[INST] Q0 [\\INST] ", " No0." + E, False),       # index 0: i = 0, trailing space
          DertaRecord("[INST] Q2 [\\INST] one", " No2." + E, False),    # 3 words: i in [1, 1]
          DertaRecord("[INST] Q3 [\\INST] ", " No3." + E, False),       # index 3: i = 0
          DertaRecord("[INST] Q4 [\\INST] u", " No4." + E, False)]
VANILLA = [DertaRecord("[INST] Q0 [\\INST]", " No0." + E, False),
           DertaRecord("[INST] Q2 [\\INST]", " No2." + E, False),
           DertaRecord("[INST] Q3 [\\INST]", " No3." + E, False),
           DertaRecord("[INST] Q4 [\\INST]", " No4." + E, False)]


@pytest.mark.parametrize("name,counts,expected", [
    ("derta", dict(rto_count=3, prefix_count=4), H + RTO[:3] + PREFIX),
    ("vanilla", dict(vanilla_count=3), H + VANILLA[:3]),
    ("recaug", dict(prefix_count=2), H + PREFIX[:2]),
    ("rto_only", dict(rto_count=2, vanilla_count=3), H + RTO[:2] + VANILLA[:3]),
])
def test_mixtures_match_hand_written_records(name, counts, expected):
    assert recipe.build_mixture(name, TRIPLES, PAIRS, seed=0, **counts) == expected


def test_official_json_shape():
    assert RTO[0].to_json() == {"prefix": "[INST] Q0 [\\INST]", "text": " a b c d<|end_of_text|>", "safe": "true"}
    assert PREFIX[1].to_json()["safe"] == "false"


def test_word_cut_follows_the_seeded_randint_sequence():
    words = " ".join(f"w{j}" for j in range(12))  # 12 words: i in [1, 10]
    triples = [{"query": f"q{i}", "harmful_response": words, "safe_response": "s"} for i in range(30)]
    rng = random.Random(7)
    draws = [rng.randint(1, 10) for _ in range(30)]  # one draw per kept triple, also for index % 3 == 0
    got = recipe.harmful_prefix_records(triples, base_template(), seed=7)
    for i, r in enumerate(got):
        cut = 0 if i % 3 == 0 else draws[i]
        assert r.prefix == f"[INST] q{i} [\\INST] " + " ".join(words.split(" ")[:cut])
    assert {len(r.prefix.split("] ")[1].split()) for r in got[1::3]} != {0}


def test_token_cut_keeps_prefix_bare_and_carries_the_harmful_response():
    got = recipe.harmful_prefix_records(TRIPLES, base_template(), cut="token")
    assert [r.prefix for r in got] == ["[INST] Q0 [\\INST]", "[INST] Q2 [\\INST]", "[INST] Q3 [\\INST]", "[INST] Q4 [\\INST]"]
    assert got[1].harmful == " one two three" and got[1].text == " No2." + E


def _render(messages, add_generation_prompt):
    """A chat template: <S>system</S> <U>user</U> <A>assistant<END>, then <A> for the next turn."""
    tags = {"system": "<S>{}</S>", "user": "<U>{}</U>", "assistant": "<A>{}<END>"}
    return "".join(tags[m["role"]].format(m["content"]) for m in messages) + ("<A>" if add_generation_prompt else "")


def test_chat_template_puts_the_harmful_prefix_in_the_assistant_turn():
    t = Template(kind="chat", eos="<END>", render=_render)
    got = recipe.harmful_prefix_records(TRIPLES, t)
    assert got[0] == DertaRecord("<U>Q0</U><A>", "No0.<END>", False)
    assert got[1] == DertaRecord("<U>Q2</U><A>one", " No2.<END>", False)


def test_chat_token_cut_text_is_the_vanilla_one_and_a_space_joins_after_a_cut():
    t = Template(kind="chat", eos="<END>", render=_render)
    got = recipe.harmful_prefix_records(TRIPLES, t, cut="token")
    assert got[1] == DertaRecord("<U>Q2</U><A>", "No2.<END>", False, harmful="one two three",
                                 cut_text=" No2.<END>")
    assert got[1].text == recipe.vanilla_records(TRIPLES, t)[1].text
    assert got[1].to_json() == {"prefix": "<U>Q2</U><A>", "text": "No2.<END>", "safe": "false",
                                "harmful": "one two three", "cut_text": " No2.<END>"}
    assert DertaRecord.from_json(got[1].to_json()) == got[1]
    base = recipe.harmful_prefix_records(TRIPLES, base_template(), cut="token")[1]
    assert base.cut_text == "" and DertaRecord.from_json(base.to_json()) == base  # base: text already joins


@pytest.mark.parametrize("kwargs,match", [
    (dict(recipe="nope"), "recipe='nope'"),
    (dict(recipe="derta", rto_count=4), "rto_count=4 but the sources give only 3"),
    (dict(recipe="derta", vanilla_count=1), "vanilla_count=1 given but recipe 'derta'"),
    (dict(recipe="derta", prefix_count=-2, rto_count=1), r"prefix_count=-2 must be >= 0 \(or -1"),
    (dict(recipe="derta", rto_count=1, prefix_count=1, cut="char"), "cut='char'"),
])
def test_bad_mixture_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recipe.build_mixture(safety=TRIPLES[:3], helpful=PAIRS, **kwargs)


def test_official_counts_take_what_small_sources_have_and_log_it(caplog):
    with caplog.at_level(logging.INFO, logger="derta_jax.data.recipe"):
        assert recipe.build_mixture("derta", TRIPLES, PAIRS) == H + RTO + PREFIX
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "rto: 5 of the official 3,000 examples (all the sources give)"),
        ("WARNING", "prefix: 4 of the official 3,000 examples (all the sources give)"),
        ("INFO", "recipe derta: 2 helpful + 5 rto + 4 prefix = 11 records")]
    # -1 (the config's "official") is None; a part the recipe does not use may be -1 too
    assert recipe.build_mixture("derta", TRIPLES, PAIRS, rto_count=-1, prefix_count=-1,
                                vanilla_count=-1, helpful_count=-1) == H + RTO + PREFIX
    assert recipe.build_mixture("vanilla", TRIPLES, PAIRS, rto_count=-1) == H + VANILLA


def test_explicit_count_larger_than_the_sources_is_an_error():
    with pytest.raises(ValueError, match=r"^prefix_count=5 but the sources give only 4 prefix examples"):
        recipe.build_mixture("derta", TRIPLES, PAIRS, prefix_count=5)
    with pytest.raises(ValueError, match=r"^helpful_count=3 but the sources give only 2 helpful"):
        recipe.build_mixture("vanilla", TRIPLES, PAIRS, helpful_count=3, vanilla_count=1)


def test_recipes_are_the_one_list_of_names_and_official_counts():
    assert recipe.RECIPES == {"derta": {"rto": 3000, "prefix": 3000}, "vanilla": {"vanilla": 6000},
                              "recaug": {"prefix": 6000}, "rto_only": {"rto": 3000, "vanilla": 3000}}
    assert list(recipe.RECIPES["derta"]) == ["rto", "prefix"]  # the mixing order
    assert "derta" in recipe.RECIPES and "nope" not in recipe.RECIPES
    assert recipe.safety_counts("rto_only") == {"rto_count": 3000, "vanilla_count": 3000}
    assert recipe.safety_counts("derta", 301) == {"rto_count": 150, "prefix_count": 151}
    assert recipe.safety_counts("recaug", 7) == {"prefix_count": 7}
    with pytest.raises(ValueError, match="recipe='x': expected one of derta, vanilla, recaug, rto_only"):
        recipe.safety_counts("x")


CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]


@pytest.mark.parametrize("all_turns", [True, False])
def test_multi_turn_records_sit_in_the_last_turn_and_carry_earlier_turns(all_turns):
    t = Template(kind="chat", eos="<END>", render=_render, all_turns=all_turns)
    triple = {**TRIPLES[2], "messages": CHAT, "id": "s.jsonl:1"}
    pair = {"messages": CHAT, "output": "O2", "id": "h.jsonl:1"}
    prompt = "<S>S</S><U>U1</U><A>A1<END><U>Q2</U><A>"
    turns = ((len("<S>S</S><U>U1</U><A>"), len("<S>S</S><U>U1</U><A>A1<END>")),) if all_turns else ()
    assert [prompt[a:b] for a, b in turns] == (["A1<END>"] if all_turns else [])
    assert recipe.helpful_records([pair], t) == [DertaRecord(prompt, "O2<END>", False, turns=turns)]
    assert recipe.rto_records([triple], t) == [DertaRecord(prompt, "one two three<END>", True, turns=turns)]
    assert recipe.harmful_prefix_records([TRIPLES[0], TRIPLES[1], triple], t, seed=0) == [
        DertaRecord("<U>Q0</U><A>", "No0.<END>", False),
        DertaRecord(prompt + "one", " No2.<END>", False, turns=turns)]
    assert recipe.vanilla_records([triple], t) == [DertaRecord(prompt, "No2.<END>", False, turns=turns)]
    rec = recipe.rto_records([triple], t)[0]
    assert DertaRecord.from_json(rec.to_json()) == rec


def test_multi_turn_errors_name_the_row_and_show_the_rendered_text():
    def drops_content(messages, gen):  # renders every assistant turn without its content
        return _render([{**m, "content": ""} if m["role"] == "assistant" else m for m in messages], gen)

    def drops_earlier_turns(messages, gen):  # an assistant turn followed by others renders as "."
        return _render([{**m, "content": "."} if m["role"] == "assistant" and i < len(messages) - 1 else m
                        for i, m in enumerate(messages)], gen)

    triple = {**TRIPLES[2], "messages": CHAT, "id": "s.jsonl:7"}
    t = Template(kind="chat", eos="<END>", render=drops_content)
    with pytest.raises(ValueError, match=r"s\.jsonl:7: message 2 \(assistant\) renders empty, so its loss "
                                         r"mask is empty: '<S>S</S><U>U1</U><A><END>'"):
        recipe.rto_records([triple], t)
    t = Template(kind="chat", eos="<END>", render=drops_earlier_turns)
    with pytest.raises(ValueError, match=r"s\.jsonl:7: the chat template is not prefix-stable at message 2 .*"
                                         r"'<S>S</S><U>U1</U><A>A1<END>'.*'<S>S</S><U>U1</U><A>.<END><U>Q2</U><A>'"):
        recipe.rto_records([triple], t)
    assert recipe.rto_records([triple], Template(kind="chat", eos="<END>", render=drops_earlier_turns,
                                                  all_turns=False))[0].turns == ()
    with pytest.raises(ValueError, match=r"s\.jsonl:7: multi-turn rows \(messages\) need the chat template"):
        recipe.rto_records([triple], base_template())
