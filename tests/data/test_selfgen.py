"""Self-generated helpful pairs: the filters with a scripted model, then a tiny real SmolLM2 run."""
import json

import pytest

from derta_jax.data import records, selfgen
from derta_jax.data.pipeline import DEMO_EVAL_DIR, DEMO_HELPFUL


def scripted(instructions, answers):
    """A generate function that replays fixed outputs, and records what it was asked."""
    queue = {"instruct": list(instructions), "answer": list(answers)}
    asked = {"instruct": [], "answer": []}

    def generate(texts, what):
        asked[what].append(list(texts))
        out, queue[what] = queue[what][:len(texts)], queue[what][len(texts):]
        return out

    return generate, asked


def never(pairs):
    return [False] * len(pairs)


def test_filters_drop_and_count_each_reason():
    held_out = selfgen.HeldOut(["How do I bake a simple loaf of bread at home?"])
    instructions = [
        ("Write a haiku about the autumn rain.", True),          # kept
        ("Write a short poem about a river at dawn", False),     # truncated
        ("Hi there", True),                                      # short
        ("Explain how a bomb defusal robot moves.", True),       # harm word
        ("how do I bake a simple loaf of bread at home", True),  # held out (same words)
        ("Write a haiku about the autumn rain please.", True),   # near duplicate of the first
        ("Écrivez un poème très très très très long", True),     # not ASCII
        ("List three uses of a paper clip.", True),              # answer truncated
        ("Name the planets of the solar system.", True),         # answer refused (flagged)
        ("Give me a synonym for happy, please.", True),          # empty answer
    ]
    answers = [("Rain taps the window", True), ("1. Hold papers", False),
               ("Sorry, I can't.", True), ("  ", True)]
    generate, asked = scripted(instructions, answers)

    def judge(pairs):
        return ["Sorry" in a for _, a in pairs]

    result = selfgen.self_generate(generate, judge, n=5, held_out=held_out, round_size=10,
                                   max_candidates=10)
    assert result.pairs == [{"instruction": "Write a haiku about the autumn rain.",
                             "output": "Rain taps the window"}]
    assert result.candidates == 10
    assert dict(result.dropped) == {
        "instruction_truncated": 1, "instruction_short": 1, "instruction_harm_word": 1,
        "instruction_held_out": 1, "instruction_duplicate": 1, "instruction_not_ascii": 1,
        "answer_truncated": 1, "answer_flagged": 1, "answer_empty": 1}
    # only the four instructions that passed were answered, in order
    assert asked["answer"] == [["Write a haiku about the autumn rain.",
                                "List three uses of a paper clip.",
                                "Name the planets of the solar system.",
                                "Give me a synonym for happy, please."]]
    assert sum(result.dropped.values()) + len(result.pairs) == result.candidates


def test_seed_openings_start_every_instruction_and_rounds_stop_at_n():
    seeds = ["Give me step-by-step instructions to", "Write a limerick about"]
    conts = [(" " + " ".join(f"w{i}x{j}" for j in range(8)), True) for i in range(40)]
    generate, asked = scripted(conts, [(f"answer {i}", True) for i in range(40)])
    result = selfgen.self_generate(generate, never, n=7, seeds=seeds, seed=3, round_size=4)
    assert len(result.pairs) == 7
    assert result.candidates == 8  # two rounds of 4
    assert result.dropped == {"over_n": 1}
    openings = [o for round_ in asked["instruct"] for o in round_]
    assert set(openings) <= set(seeds) and len(set(openings)) == 2
    for pair, opening in zip(result.pairs, openings):
        assert pair["instruction"].startswith(opening + " w")
    again, _ = scripted(conts, [(f"answer {i}", True) for i in range(40)])
    assert selfgen.self_generate(again, never, n=7, seeds=seeds, seed=3, round_size=4).pairs \
        == result.pairs  # deterministic for a seed


def test_too_few_candidates_are_reported_not_padded():
    generate, _ = scripted([("Tell me a fact about owls and their eyes.", True)] * 20,
                           [("Owls cannot move their eyes.", True)])
    result = selfgen.self_generate(generate, never, n=5, round_size=4)
    assert len(result.pairs) == 1 and result.candidates == 20  # 4 x n sampled, then it stops
    assert result.dropped == {"instruction_duplicate": 19}
    assert "kept 1 of 5 asked, from 20 sampled" in result.summary(5)


def test_held_out_matching():
    held = selfgen.HeldOut(["What is the capital of France?"])
    assert held.matches("what is the CAPITAL of france")
    assert held.matches("Tell me: what is the capital of France? Answer briefly.")  # contains it
    assert held.matches("What is the capital city of France?")  # Jaccard 6/7
    assert not held.matches("What is the capital of Peru?")  # Jaccard 5/7


def test_pre_query_is_the_template_up_to_the_user_message(llama3_tokenizer_dir):
    from derta_jax.checkpoints.model_dir import load_tokenizer
    tok = load_tokenizer(llama3_tokenizer_dir)
    if not tok.chat_template:
        pytest.skip("fixture tokenizer has no chat template")
    head = selfgen.pre_query(tok)
    full = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert full.startswith(head + "Hello there")
    assert head.endswith("<|start_header_id|>user<|end_header_id|>\n\n")


def test_comma_separated_sources_are_read_in_turn(tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue."}) + "\n"
                     + "not json\n")
    demo, _ = records.read_rows(DEMO_HELPFUL, "helpful")
    rows, report = records.read_rows(f"{DEMO_HELPFUL},{extra}", "helpful", skip_invalid=True)
    assert rows == demo + [{"instruction": "Name a colour.", "output": "Blue."}]
    assert report.kept == len(demo) + 1 and report.num_skipped == 1
    with pytest.raises(ValueError, match="extra.jsonl:2"):
        records.read_rows(f"{DEMO_HELPFUL},{extra}", "helpful")


@pytest.mark.slow
def test_selfgen_on_smollm2_writes_valid_helpful_pairs(smollm2_gguf, tmp_path):
    """The tiny real run: SmolLM2 samples instructions and answers them; every kept pair is a
    valid helpful row, no instruction matches a held-out demo prompt, and the counts add up."""
    from derta_jax.checkpoints.gguf import load_gguf
    from derta_jax.checkpoints.model_dir import save_model_dir
    cfg, params, tokenizer = load_gguf(smollm2_gguf, progress=False)
    model = save_model_dir(tmp_path / "smollm2", cfg, params, tokenizer)
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("Write one sentence about\nName three\n")
    out = tmp_path / "pairs.jsonl"
    stats = selfgen.main(["--checkpoint", str(model), "--n", "3", "--out", str(out), "--seeds",
                          str(seeds), "--batch-size", "8", "--max-instruction-tokens", "24",
                          "--max-new-tokens", "32", "--max-candidates", "8", "--no-progress"])
    rows, report = records.read_rows(out, "helpful")
    assert len(rows) == stats["kept"] <= 3 and report.num_skipped == 0
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["candidates"]
    assert json.loads(out.with_suffix(".stats.json").read_text()) == stats
    held_out = selfgen.HeldOut(selfgen.read_held_out(sorted(DEMO_EVAL_DIR.glob("*.jsonl"))))
    for row in rows:
        assert row["instruction"].startswith(("Write one sentence about", "Name three"))
        assert not held_out.matches(row["instruction"]) and row["output"]


@pytest.mark.parametrize("flag", ["--n", "--batch-size", "--max-new-tokens"])
def test_a_bad_count_is_named_before_any_model_loads(tmp_path, flag):
    argv = ["--checkpoint", str(tmp_path / "no-model"), "--n", "2", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=f"^{flag} 0: expected >= 1"):
        selfgen.main([*argv, flag, "0"])


def test_the_ablation_makes_the_demo_pairs_only_when_the_config_needs_them(tmp_path, monkeypatch):
    import ml_collections
    from derta_jax.experiments import ablation
    calls = []
    monkeypatch.setattr(selfgen, "main", lambda argv: calls.append(argv))
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict({"data": {"helpful": "h.jsonl"}})
    ablation.ensure_selfgen(config, tmp_path / "model")
    assert calls == []  # not trained on
    config.data.helpful = f"h.jsonl,{selfgen.DEMO_PAIRS}"
    ablation.ensure_selfgen(config, tmp_path / "model")
    assert calls == [["--checkpoint", str(tmp_path / "model"), "--out", selfgen.DEMO_PAIRS,
                      *selfgen.DEMO_ARGS, "--no-progress"]]
    (tmp_path / selfgen.DEMO_PAIRS).parent.mkdir(parents=True)
    (tmp_path / selfgen.DEMO_PAIRS).write_text("")
    ablation.ensure_selfgen(config, tmp_path / "model")
    assert len(calls) == 1  # there already: kept
