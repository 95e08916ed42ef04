"""A small end-to-end eval of the real SmolLM2-135M: our answers equal transformers' greedy ones.

Run with the parameters split over the 8 test devices (fsdp): each device holds 1/8 of them.
"""
import json

import pytest

from derta_jax import eval as eval_cli
from derta_jax.checkpoints.gguf import load_gguf
from derta_jax.checkpoints.model_dir import save_model_dir

DEMO = "derta_jax/data/demo/eval"
MAX_NEW = 16


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    cfg, params, tokenizer = load_gguf(smollm2_gguf, progress=False)
    return save_model_dir(tmp_path_factory.mktemp("models") / "smollm2", cfg, params, tokenizer)


@pytest.mark.slow
def test_smollm2_eval_matches_transformers_greedy(smollm2_dir, smollm2_gguf, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    tests = f"{DEMO}/safety_harmful_questions.jsonl"
    rep = eval_cli.main(["--checkpoint", str(smollm2_dir), "--tests", tests, "--out",
                         str(tmp_path), "--limit", "2", "--chat", "--max-new-tokens", str(MAX_NEW),
                         "--batch-size", "2", "--mesh", "1,8,1", "--no-progress"])
    assert set(rep["table"]) == {"harmful_questions"}
    rows = [json.loads(line) for line in (tmp_path / "harmful_questions.jsonl").open()]
    assert len(rows) == 2
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                              torch_dtype=torch.float32)
    from derta_jax.checkpoints.model_dir import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    for row in rows:
        ids = tok(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=MAX_NEW, do_sample=False,
                              eos_token_id=[tok.eos_token_id], pad_token_id=tok.eos_token_id)
        reference = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert row["response"] == reference, row["question"]
