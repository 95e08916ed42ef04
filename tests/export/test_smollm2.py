"""SmolLM2 from its GGUF -> convert -> export: the float32 tensors transformers' GGUF loader
gives, bit for bit, and the same logits once transformers loads the export."""
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from derta_jax import convert, export


@pytest.mark.slow
def test_smollm2_export_equals_transformers_gguf_tensors_and_logits(smollm2_gguf, tmp_path):
    model_dir = convert.main(["--gguf", str(smollm2_gguf), "--out", str(tmp_path / "model")])
    out = export.main(["--checkpoint", str(model_dir), "--out", str(tmp_path / "hf"),
                       "--max-shard-size", "200MB"])
    reference = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    state = reference.state_dict()
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == 3  # 538 MB of float32 in 200 MB shards
    names = set()
    for shard in shards:
        with safe_open(shard, framework="numpy") as f:
            for name in f.keys():
                np.testing.assert_array_equal(f.get_tensor(name), state[name].numpy(), err_msg=name)
                names.add(name)
    assert set(state) - names == {"lm_head.weight"}  # tied to the embedding
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert loaded.generation_config.eos_token_id == 2
