"""The LLaMA-3 tokenizer fixture loads and matches the facts in its SOURCE.md."""
from transformers import AutoTokenizer

from derta_jax.checkpoints.model_dir import load_tokenizer, save_model_dir
from derta_jax.models.config import preset

FACTS = {"Sorry": [19701], " Sorry": [33386], "sorry": [68697], "<|end_of_text|>": [128001],
         "<|eot_id|>": [128009]}


def _check(tok):
    assert len(tok) == 128256
    for text, ids in FACTS.items():
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
    # A plain ByteLevel post-processor: no <|begin_of_text|> is added even with special tokens.
    assert tok("[INST] hi [\\INST]")["input_ids"] == [58, 65562, 60, 15960, 94915, 65562, 60]


def test_fixture_matches_source_md(llama3_tokenizer_dir):
    _check(AutoTokenizer.from_pretrained(llama3_tokenizer_dir))


def test_fixture_survives_a_model_dir(llama3_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    save_model_dir(tmp_path, preset("llama3-8b"), None, tok)
    _check(load_tokenizer(tmp_path))
