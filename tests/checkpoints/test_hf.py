"""load_hf against tiny random checkpoints written by transformers' save_pretrained."""
import copy
import json
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors import safe_open

from derta_jax.checkpoints.hf import load_hf
from derta_jax.models.config import RopeScaling


def reference_tree(model) -> dict:
    """The canonical tree written out literally from the torch state dict (docs/architecture.md)."""
    c = model.config
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    Dh = D // H
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tree = {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
            "final_norm": {"scale": sd["model.norm.weight"]}}
    if not c.tie_word_embeddings:
        tree["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "post_attn_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "attn": {  # W[h * Dh + k, d] -> kernel[d, h, k]; o: W[d, h * Dh + k] -> kernel[h, k, d]
                "q_proj": {"kernel": sd[p + "self_attn.q_proj.weight"].reshape(H, Dh, D).transpose(2, 0, 1)},
                "k_proj": {"kernel": sd[p + "self_attn.k_proj.weight"].reshape(K, Dh, D).transpose(2, 0, 1)},
                "v_proj": {"kernel": sd[p + "self_attn.v_proj.weight"].reshape(K, Dh, D).transpose(2, 0, 1)},
                "o_proj": {"kernel": sd[p + "self_attn.o_proj.weight"].reshape(D, H, Dh).transpose(1, 2, 0)},
            },
        }
        if p + "mlp.experts.gate_up_proj" in sd:  # transformers 5 keeps experts fused in memory
            gate_up, F = sd[p + "mlp.experts.gate_up_proj"], c.intermediate_size
            layer["moe"] = {
                "router": {"kernel": sd[p + "mlp.gate.weight"].T},
                "gate_proj": {"kernel": np.stack([g[:F].T for g in gate_up])},
                "up_proj": {"kernel": np.stack([g[F:].T for g in gate_up])},
                "down_proj": {"kernel": np.stack([w.T for w in sd[p + "mlp.experts.down_proj"]])},
            }
        else:
            layer["mlp"] = {n: {"kernel": sd[p + f"mlp.{n}.weight"].T}
                            for n in ("gate_proj", "up_proj", "down_proj")}
        tree[f"layers_{i}"] = layer
    return tree


def assert_trees_equal(ours, expected):
    assert jax.tree.structure(ours) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree.leaves_with_path(ours), jax.tree.leaves(expected)):
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a, np.float32), b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "mistral", "mixtral"])
def test_params_equal_hf_tensors(hf_checkpoint, kind):
    folder, model = hf_checkpoint(kind)
    cfg, params = load_hf(folder, progress=False)
    assert_trees_equal(params, reference_tree(model))
    assert ("lm_head" in params) == (kind != "llama_tied")
    assert cfg.model_type == model.config.model_type and cfg.num_layers == 2


def test_kernels_compute_the_hf_projections(hf_checkpoint):
    """Functional check: our kernels reproduce the torch modules' outputs."""
    folder, model = hf_checkpoint("llama")
    _, params = load_hf(folder, progress=False)
    layer, ours = model.model.layers[1], params["layers_1"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        q = layer.self_attn.q_proj(x).numpy().reshape(3, 4, 8)
        o = layer.self_attn.o_proj(x).numpy()
        mlp = layer.mlp(x).numpy()
    xn = x.numpy()
    np.testing.assert_allclose(np.einsum("bd,dhk->bhk", xn, ours["attn"]["q_proj"]["kernel"]), q, atol=1e-5)
    np.testing.assert_allclose(np.einsum("bhk,hkd->bd", xn.reshape(3, 4, 8), ours["attn"]["o_proj"]["kernel"]),
                               o, atol=1e-5)
    m = ours["mlp"]
    g = xn @ m["gate_proj"]["kernel"]
    np.testing.assert_allclose((g / (1 + np.exp(-g)) * (xn @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"],
                               mlp, atol=1e-5)


def test_mixtral_experts_compute_the_hf_experts(hf_checkpoint):
    folder, model = hf_checkpoint("mixtral")
    _, params = load_hf(folder, progress=False)
    moe, experts = params["layers_0"]["moe"], model.model.layers[0].mlp.experts
    x = torch.randn(5, 32)
    for e in range(4):
        with torch.no_grad():
            ref = experts(x, torch.full((5, 1), e), torch.ones(5, 1)).numpy()
        g = x.numpy() @ moe["gate_proj"]["kernel"][e]
        ours = (g / (1 + np.exp(-g)) * (x.numpy() @ moe["up_proj"]["kernel"][e])) @ moe["down_proj"]["kernel"][e]
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f"expert {e}")


def test_mixtral_fused_expert_names_load_too(hf_checkpoint, tmp_path):
    """A state dict saved as transformers 5 holds it in memory (fused gate_up_proj) loads the same."""
    folder, model = hf_checkpoint("mixtral")
    shutil.copy(folder / "config.json", tmp_path)
    save_file({k: v.contiguous().numpy() for k, v in model.state_dict().items()},
              tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "numpy") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    _, params = load_hf(tmp_path, progress=False)
    assert_trees_equal(params, reference_tree(model))


def test_hub_and_transformers5_config_json_load_the_same(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    written = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written  # transformers 5 shape
    hub = {k: v for k, v in written.items() if k != "rope_parameters"}
    rope = dict(written["rope_parameters"])
    hub["rope_theta"] = rope.pop("rope_theta")
    hub["rope_scaling"] = rope
    shutil.copytree(folder, tmp_path / "hub")
    (tmp_path / "hub" / "config.json").write_text(json.dumps(hub))
    cfg_v5, params_v5 = load_hf(folder, progress=False)
    cfg_hub, params_hub = load_hf(tmp_path / "hub", progress=False)
    assert cfg_v5 == cfg_hub
    assert cfg_v5.rope_theta == 500000.0
    assert cfg_v5.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    assert_trees_equal(params_v5, params_hub)


def test_sharded_checkpoint_equals_single_file(hf_checkpoint, tmp_path):
    folder, model = hf_checkpoint("mixtral")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert_trees_equal(load_hf(tmp_path, progress=False)[1], reference_tree(model))


def test_bfloat16_checkpoint_loads_without_torch(hf_checkpoint, tmp_path):
    """bf16 safetensors are read with numpy + ml_dtypes; torch is blocked in the subprocess."""
    _, model = hf_checkpoint("llama")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)  # the fixture is shared
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from derta_jax.checkpoints.hf import load_hf\n"
        f"cfg, p = load_hf({str(tmp_path)!r}, dtype='bfloat16', progress=False)\n"
        "k = p['layers_0']['attn']['q_proj']['kernel']\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        f"np.save({str(tmp_path / 'q.npy')!r}, k.astype(np.float32))\n"
        "print(k.dtype, cfg.param_dtype)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["bfloat16", "bfloat16"]
    w = model.model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "q.npy"), w.reshape(4, 8, 32).transpose(2, 0, 1))


def test_float32_checkpoint_cast_to_bfloat16(hf_checkpoint):
    folder, model = hf_checkpoint("llama")
    cfg, params = load_hf(folder, dtype="bfloat16", progress=False)
    leaves = jax.tree.leaves(params)
    assert {x.dtype for x in leaves} == {np.dtype(ml_dtypes.bfloat16)} and cfg.param_dtype == "bfloat16"
    w = model.lm_head.weight.detach().numpy().T
    np.testing.assert_array_equal(params["lm_head"]["kernel"], w.astype(ml_dtypes.bfloat16))
