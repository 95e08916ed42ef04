"""The official recipe on hand-written triples, against records written by hand from the rules."""
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
       DertaRecord("[INST] Q2 [\\INST]", " one two three" + E, True)]
PREFIX = [DertaRecord("[INST] Q0 [\\INST] ", " No0." + E, False),       # index 0: i = 0, trailing space
          DertaRecord("[INST] Q2 [\\INST] one", " No2." + E, False),    # 3 words: i in [1, 1]
          DertaRecord("[INST] Q3 [\\INST] ", " No3." + E, False),       # index 3: i = 0
          DertaRecord("[INST] Q4 [\\INST] u", " No4." + E, False)]
VANILLA = [DertaRecord("[INST] Q0 [\\INST]", " No0." + E, False),
           DertaRecord("[INST] Q2 [\\INST]", " No2." + E, False),
           DertaRecord("[INST] Q3 [\\INST]", " No3." + E, False)]


@pytest.mark.parametrize("name,counts,expected", [
    ("derta", dict(rto_count=3, prefix_count=4), H + RTO + PREFIX),
    ("vanilla", dict(vanilla_count=3), H + VANILLA),
    ("recaug", dict(prefix_count=2), H + PREFIX[:2]),
    ("rto_only", dict(rto_count=2, vanilla_count=3), H + RTO[:2] + VANILLA),
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


def test_chat_template_puts_the_harmful_prefix_in_the_assistant_turn():
    t = Template(kind="chat", eos="<END>", chat_prefix="<U>", chat_suffix="</U><A>")
    got = recipe.harmful_prefix_records(TRIPLES, t)
    assert got[0] == DertaRecord("<U>Q0</U><A>", "No0.<END>", False)
    assert got[1] == DertaRecord("<U>Q2</U><A>one", " No2.<END>", False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(recipe="nope"), "recipe='nope'"),
    (dict(recipe="derta", rto_count=4), "rto_count=4 but the sources give only 3"),
    (dict(recipe="derta", vanilla_count=1), "vanilla_count=1 given but recipe 'derta'"),
    (dict(recipe="derta", prefix_count=-1, rto_count=1), "prefix_count=-1"),
    (dict(recipe="derta", rto_count=1, prefix_count=1, cut="char"), "cut='char'"),
])
def test_bad_mixture_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recipe.build_mixture(safety=TRIPLES[:3], helpful=PAIRS, **kwargs)


def test_official_defaults_need_enough_data():
    with pytest.raises(ValueError, match="rto_count=3000"):
        recipe.build_mixture("derta", TRIPLES, PAIRS)
