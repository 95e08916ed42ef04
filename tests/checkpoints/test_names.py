"""The name map in both directions, without files: every Hugging Face tensor lands on a canonical
leaf of the right shape, and `to_hf_layout` gives the Hugging Face array back."""
import numpy as np
import pytest

from derta_jax.checkpoints.names import canonical_shapes, hf_tensor_specs, to_hf_layout
from derta_jax.models.config import ModelConfig

SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=6)
CONFIGS = {"llama": ModelConfig(**SMALL),
           "llama_tied": ModelConfig(**SMALL, tie_word_embeddings=True),
           "mixtral": ModelConfig(**SMALL, model_type="mixtral", num_experts=3)}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_every_hf_tensor_fills_one_canonical_leaf_and_maps_back(kind):
    cfg = CONFIGS[kind]
    shapes = canonical_shapes(cfg)
    specs = hf_tensor_specs(cfg)
    rng = np.random.default_rng(0)
    filled = []
    for name, spec in specs.items():
        x = rng.standard_normal(spec.shape).astype(np.float32)
        ((path, to_canonical),) = spec.outputs
        y = to_canonical(x)
        expected = shapes[path] if spec.expert is None else shapes[path][1:]
        assert y.shape == expected, name
        np.testing.assert_array_equal(to_hf_layout(y, path, spec.shape), x, err_msg=name)
        filled.append((path, spec.expert))
    per_expert = lambda p: p[1] == "moe" and p[2] != "router"  # noqa: E731
    expected = {(p, e) for p in shapes for e in (range(cfg.num_experts) if per_expert(p) else [None])}
    assert len(filled) == len(set(filled)) and set(filled) == expected  # every leaf, once


def test_fused_experts_split_into_gate_and_up():
    cfg = CONFIGS["mixtral"]
    E, F, D = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    spec = hf_tensor_specs(cfg, fused_experts=True)["model.layers.0.mlp.experts.gate_up_proj"]
    x = np.arange(E * 2 * F * D, dtype=np.float32).reshape(E, 2 * F, D)
    (gate_path, gate), (up_path, up) = spec.outputs
    assert gate_path[-2:] == ("gate_proj", "kernel") and up_path[-2:] == ("up_proj", "kernel")
    np.testing.assert_array_equal(gate(x), x[:, :F].transpose(0, 2, 1))
    np.testing.assert_array_equal(up(x), x[:, F:].transpose(0, 2, 1))
