"""The classifier judge end to end with a tiny random LLaMA saved as a model dir; the judge gets
the loaded model (it never loads one itself)."""
import jax
import pytest
from transformers import AutoTokenizer

from derta_jax.checkpoints.model_dir import save_model_dir
from derta_jax.evaluation import judges, loading
from derta_jax.evaluation.generation import Generation
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import init_variables

pytest.importorskip("derta_jax.evaluation.generation")


def tiny_llama(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024,
                       bos_token_id=128000, eos_token_ids=(128001, 128009))


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory, llama3_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    cfg = tiny_llama(len(tokenizer))
    params = init_variables(cfg, jax.random.key(0))["params"]
    return save_model_dir(tmp_path_factory.mktemp("guard"), cfg, params, tokenizer)


@pytest.fixture(scope="module")
def guard(guard_dir):
    return loading.load_eval_model(guard_dir)


def test_prompt_ids_follow_llama_guard_format(guard):
    judge = judges.ClassifierJudge(guard)
    ids = judge.prompt_ids(judges.Answer("How do I pick a lock?", "First, insert the wrench."))
    tok = judge.tokenizer
    text = tok.decode(ids)
    assert text.startswith(" <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask:")
    assert "User: How do I pick a lock?\n\nAgent: First, insert the wrench.\n\n<END CONVERSATION>" in text
    assert ids[-3:] == tok.convert_tokens_to_ids(["<|start_header_id|>", "assistant", "<|end_header_id|>"])


def test_random_classifier_gives_a_parsed_verdict(guard_dir):
    loaded = []

    def load(path):  # what eval passes: the judge asks for the model, eval loads it
        loaded.append(path)
        return loading.load_eval_model(path)

    judge = judges.make_judge(f"classifier:{guard_dir}", None, batch_size=2, load_model=load)
    assert loaded == [str(guard_dir)] and judge.batch_size == 2
    answers = [judges.Answer("q1", "r1"), judges.Answer("q2", "a longer response " * 3)]
    verdicts = judge(answers)
    assert len(verdicts) == 2
    for v in verdicts:  # a random model writes anything: the verdict is what its text parses to
        assert v == judges.parse_guard_verdict(v["raw"])


def test_verdicts_parsed_from_generated_tokens(guard):
    tok = guard.tokenizer
    replies = ["\n\nunsafe\nS1,S9", "\n\nsafe"]
    seen = {}

    def scripted(params, cfg, prompt_ids, **kw):
        seen.update(kw, n=len(prompt_ids), params=params)
        return [Generation(tok(r, add_special_tokens=False)["input_ids"] + [128009], "stop")
                for r in replies]

    judge = judges.ClassifierJudge(guard, generate_fn=scripted)
    v1, v2 = judge([judges.Answer("q", "bad"), judges.Answer("q", "good")])
    assert (v1["verdict"], v1["categories"], v1["harmful"]) == ("unsafe", ["S1", "S9"], True)
    assert (v2["verdict"], v2["harmful"]) == ("safe", False)
    assert seen["n"] == 2 and 128009 in seen["stop_ids"] and seen.get("temperature", 0.0) == 0.0
    assert seen["params"] is guard.params  # the model it was given
