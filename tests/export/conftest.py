"""Tiny random Hugging Face models (the reference) and the convert step in front of export."""
import pathlib

import pytest
import torch
import transformers

from derta_jax import convert

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}


def tiny_hf_model(kind: str) -> transformers.PreTrainedModel:
    """llama (3.1 rope scaling, untied), llama_tied, mistral (window 8), mixtral (4 experts)."""
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**TINY, rope_parameters=LLAMA31_ROPE))
    if kind == "llama_tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=8))
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2))
    raise ValueError(kind)


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """kind -> (folder written by save_pretrained, the model in eval mode)."""
    cache: dict[str, tuple[pathlib.Path, transformers.PreTrainedModel]] = {}

    def get(kind: str) -> tuple[pathlib.Path, transformers.PreTrainedModel]:
        if kind not in cache:
            model = tiny_hf_model(kind).eval()
            folder = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(folder)
            cache[kind] = (folder, model)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def model_dir(hf_model, llama3_tokenizer_dir, tmp_path_factory):
    """kind -> a model dir converted from hf_model(kind) by `python -m derta_jax.convert`."""
    cache: dict[str, pathlib.Path] = {}

    def get(kind: str) -> pathlib.Path:
        if kind not in cache:
            folder, _ = hf_model(kind)
            out = tmp_path_factory.mktemp(f"md_{kind}") / "model"
            cache[kind] = convert.main(["--hf", str(folder), "--out", str(out),
                                        "--tokenizer", str(llama3_tokenizer_dir)])
        return cache[kind]

    return get
