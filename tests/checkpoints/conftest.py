"""Tiny random Hugging Face checkpoints saved by transformers (the reference writer)."""
import pathlib

import pytest
import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}


def tiny_model(kind: str) -> transformers.PreTrainedModel:
    """A tiny random model of `kind`: llama (3.1 rope, untied), llama_tied, mistral, mixtral."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_parameters=LLAMA31_ROPE)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "llama_tied":
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**TINY, sliding_window=8)
        return transformers.MistralForCausalLM(cfg)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(cfg)
    raise ValueError(kind)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """kind -> (folder written by save_pretrained, the model). Built once per kind."""
    cache: dict[str, tuple[pathlib.Path, transformers.PreTrainedModel]] = {}

    def get(kind: str) -> tuple[pathlib.Path, transformers.PreTrainedModel]:
        if kind not in cache:
            model = tiny_model(kind)
            folder = tmp_path_factory.mktemp(kind)
            model.save_pretrained(folder)
            cache[kind] = (folder, model)
        return cache[kind]

    return get
