"""Logits (and Mixtral's router loss) vs transformers in PyTorch float32, tiny random models.

Each reference model is built with a fixed torch seed, written with save_pretrained and read back
with our checkpoint loader, so these tests also cover the name/shape mapping of load_hf.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from derta_jax.checkpoints.hf import load_hf
from derta_jax.models.decoder import Decoder

SEQ = 24
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")


def _reference(hf_config, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    model.save_pretrained(tmp_path)
    return model


def _tokens(vocab: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, SEQ), dtype=np.int64)


def _ours(folder, tokens: np.ndarray, **runtime):
    cfg, params = load_hf(folder, progress=False)
    cfg = cfg.replace(**runtime)
    B, L = tokens.shape
    positions = np.broadcast_to(np.arange(L), (B, L))
    logits, aux = jax.jit(Decoder(cfg).apply)(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.ones((B, L), jnp.int32))
    return cfg, np.asarray(logits), aux


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_llama31_rope_scaling_logits_match_transformers(tmp_path):
    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=32)
    hf_config = transformers.LlamaConfig(**SMALL, rope_parameters=rope)
    model = _reference(hf_config, tmp_path)
    # Long enough positions that all three llama3 bands (kept, interpolated, divided) matter.
    tokens = _tokens(hf_config.vocab_size)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    cfg, ours, aux = _ours(tmp_path, tokens)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert _relative_error(ours, ref) < 1e-5
    assert float(aux["router_loss"]) == 0.0


def test_mistral_sliding_window_logits_match_transformers(tmp_path):
    hf_config = transformers.MistralConfig(**SMALL, sliding_window=8, rope_theta=10000.0)
    model = _reference(hf_config, tmp_path)
    tokens = _tokens(hf_config.vocab_size)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    cfg, ours, _ = _ours(tmp_path, tokens)
    assert cfg.sliding_window == 8
    assert _relative_error(ours, ref) < 1e-5
    # The window matters here: without it our logits differ from the reference.
    _, unwindowed, _ = _ours(tmp_path, tokens, sliding_window=None)
    assert _relative_error(unwindowed, ref) > 1e-3


def test_mixtral_logits_and_router_loss_match_transformers(tmp_path):
    hf_config = transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                           sliding_window=None, output_router_logits=True)
    model = _reference(hf_config, tmp_path)
    tokens = _tokens(hf_config.vocab_size)
    with torch.no_grad():
        out = model(torch.from_numpy(tokens), output_router_logits=True)
    cfg, ours, aux = _ours(tmp_path, tokens)
    assert cfg.num_experts == 4
    assert _relative_error(ours, out.logits.numpy()) < 1e-5
    np.testing.assert_allclose(float(aux["router_loss"]), float(out.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("runtime", [dict(scan_layers=True), dict(remat="full")])
def test_llama_runtime_options_match_transformers(tmp_path, runtime):
    """scan_layers and remat change how the layers run, not the logits."""
    from derta_jax.models.layout import stack_layers

    hf_config = transformers.LlamaConfig(**SMALL, rope_parameters=dict(rope_type="default", rope_theta=5e5))
    model = _reference(hf_config, tmp_path, seed=3)
    tokens = _tokens(hf_config.vocab_size, batch=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    cfg, params = load_hf(tmp_path, progress=False)
    cfg = cfg.replace(**runtime)
    if cfg.scan_layers:
        params = stack_layers(params)
    positions = jnp.arange(SEQ)[None]
    logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens), positions,
                                   jnp.ones((1, SEQ), jnp.int32))
    assert _relative_error(np.asarray(logits), ref) < 1e-5
