"""ModelConfig: both shapes of config.json, presets, and clear errors."""
import json

import pytest
import transformers

from derta_jax.models.config import ModelConfig, RopeScaling, preset

# Meta-Llama-3.1-8B's config.json as published on the Hub (Hub shape: rope_theta + rope_scaling).
LLAMA31_8B_HUB = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}
MISTRAL_7B_V01_HUB = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000,
}
ARCH_FIELDS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
               "num_heads", "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta",
               "rope_scaling", "max_position_embeddings", "sliding_window", "tie_word_embeddings",
               "num_experts", "bos_token_id"]


def _arch(cfg):
    return {k: getattr(cfg, k) for k in ARCH_FIELDS}


def test_hub_config_json_of_llama31_reads_its_rope_scaling():
    cfg = ModelConfig.from_hf(LLAMA31_8B_HUB)
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert _arch(cfg) == _arch(preset("llama3.1-8b"))


def test_hub_config_json_of_mistral_reads_its_window():
    cfg = ModelConfig.from_hf(MISTRAL_7B_V01_HUB)
    assert cfg.sliding_window == 4096 and cfg.head_dim == 128
    assert _arch(cfg) == _arch(preset("mistral-7b"))


def test_transformers5_rope_parameters_read_like_the_hub_shape(tmp_path):
    """save_pretrained of transformers 5 writes `rope_parameters`; we read the same values."""
    hf = transformers.LlamaConfig(**{k: v for k, v in LLAMA31_8B_HUB.items()
                                     if k not in ("architectures", "model_type")})
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written  # the shape this test is about
    cfg = ModelConfig.from_hf(tmp_path)
    assert _arch(cfg) == _arch(ModelConfig.from_hf(LLAMA31_8B_HUB))


def test_to_hf_and_to_json_read_back_equal():
    for name in ("llama3.1-8b", "mistral-7b", "mixtral-8x7b", "smollm2-135m"):
        cfg = preset(name)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name
        assert ModelConfig.from_json(cfg.to_json()) == cfg, name


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match="'gpt2'"):
        ModelConfig.from_hf({**MISTRAL_7B_V01_HUB, "model_type": "gpt2"})


def test_unknown_rope_type_is_named():
    bad = {**LLAMA31_8B_HUB, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="'yarn'"):
        ModelConfig.from_hf(bad)


def test_bad_dtype_and_unknown_preset_are_named():
    with pytest.raises(ValueError, match="dtype='float16'"):
        preset("smollm2-135m", dtype="float16")
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        preset("llama9")
