"""Hugging Face -> convert -> export -> Hugging Face: the same float32 bytes under the same names,
a config.json that transformers reads back into the same architecture (rope scaling, window)."""
import json
import pathlib

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from derta_jax import export


def read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def head_dim(config: transformers.PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "mistral", "mixtral"])
def test_export_of_a_converted_checkpoint_is_bit_identical(kind, hf_checkpoint, model_dir, tmp_path):
    folder, model = hf_checkpoint(kind)
    out = export.main(["--checkpoint", str(model_dir(kind)), "--out", str(tmp_path / "hf"),
                       "--max-shard-size", "20KB"])
    ref, got = read_safetensors(folder), read_safetensors(out)
    assert sorted(got) == sorted(ref)
    for name, array in ref.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert sorted(index["weight_map"]) == sorted(ref)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in ref.values())

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    for key in ("rope_parameters", "sliding_window", "tie_word_embeddings", "num_local_experts",
                "num_key_value_heads", "rms_norm_eps"):
        assert getattr(loaded.config, key, None) == getattr(model.config, key, None), key
    assert head_dim(loaded.config) == head_dim(model.config)
    tokens = torch.arange(40).reshape(2, 20) % model.config.vocab_size  # longer than the window
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_export_writes_the_tokenizer_and_every_eos_id(model_dir, llama3_tokenizer_dir, tmp_path):
    out = export.main(["--checkpoint", str(model_dir("llama")), "--out", str(tmp_path / "hf")])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    reference = transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    text = "Sorry, I cannot help with that. <|eot_id|>"
    assert tokenizer(text).input_ids == reference(text).input_ids
    generation = json.loads((out / "generation_config.json").read_text())
    eot = reference.convert_tokens_to_ids("<|eot_id|>")
    assert eot == 128009 and eot in generation["eos_token_id"]
    assert reference.eos_token_id in generation["eos_token_id"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_bfloat16_export_rounds_like_torch(hf_checkpoint, model_dir, tmp_path):
    folder, model = hf_checkpoint("llama")
    out = export.main(["--checkpoint", str(model_dir("llama")), "--out", str(tmp_path / "hf"),
                       "--dtype", "bfloat16"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    expected = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name].to(torch.bfloat16)), name
