"""Synthetic training workdirs (Orbax "state" with params + non-zero LoRA, written like the
trainer's): Mixtral expert adapters merged per expert, and what a PEFT adapter cannot hold."""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors import safe_open

from derta_jax import export
from derta_jax.checkpoints.model_dir import save_model_dir
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder, init_variables

MIXTRAL = ModelConfig(model_type="mixtral", vocab_size=96, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e6,
                      max_position_embeddings=64, sliding_window=None, num_experts=4,
                      bos_token_id=1, eos_token_ids=(2,), lora_rank=4, lora_alpha=8.0)


def write_workdir(root, cfg: ModelConfig, tokenizer_dir, step: int = 5):
    """A workdir whose step holds {"step", "params", "lora"} with random, non-zero lora_b."""
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x,
        variables["lora"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    save_model_dir(root / "model", cfg, None, tokenizer)
    state = {"step": np.int32(step), "params": variables["params"], "lora": lora}
    ocp.PyTreeCheckpointer().save(root / "checkpoints" / str(step) / "state", state)
    return variables["params"], lora


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory, llama3_tokenizer_dir):
    root = tmp_path_factory.mktemp("mixtral_lora")
    params, lora = write_workdir(root, MIXTRAL, llama3_tokenizer_dir)
    return root, params, lora


def test_mixtral_expert_adapters_merge_per_expert(mixtral_run, tmp_path):
    root, params, lora = mixtral_run
    out = export.main(["--checkpoint", str(root), "--out", str(tmp_path / "hf"), "--merge-lora"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % MIXTRAL.vocab_size
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    expected, _ = Decoder(MIXTRAL).apply({"params": params, "lora": lora}, tokens, positions,
                                         np.ones_like(tokens))
    without, _ = Decoder(MIXTRAL.replace(lora_rank=0)).apply({"params": params}, tokens, positions,
                                                             np.ones_like(tokens))
    assert np.abs(np.asarray(expected) - np.asarray(without)).max() > 1e-2
    with torch.no_grad():
        got = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=0)


def test_peft_adapter_refuses_expert_adapters(mixtral_run, tmp_path):
    root, _, _ = mixtral_run
    with pytest.raises(ValueError, match=r"layers_0/moe/gate_proj.*--merge-lora"):
        export.main(["--checkpoint", str(root), "--out", str(tmp_path / "a"), "--peft-adapter"])


def test_lora_checkpoint_needs_a_lora_choice(mixtral_run, tmp_path):
    root, _, _ = mixtral_run
    with pytest.raises(ValueError, match=r"has LoRA adapters \(rank 4\); pass --merge-lora or "
                                         r"--peft-adapter"):
        export.main(["--checkpoint", str(root), "--out", str(tmp_path / "a")])


def test_attention_only_adapter_has_peft_names(tmp_path, llama3_tokenizer_dir):
    cfg = MIXTRAL.replace(lora_targets=("q_proj", "v_proj"))
    write_workdir(tmp_path / "run", cfg, llama3_tokenizer_dir)
    out = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "a"),
                       "--peft-adapter", "--base-model", "mistralai/Mixtral-8x7B-v0.1"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["base_model_name_or_path"] == "mistralai/Mixtral-8x7B-v0.1"
    with safe_open(out / "adapter_model.safetensors", framework="numpy") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    prefix = "base_model.model.model.layers.1.self_attn."
    assert shapes[prefix + "q_proj.lora_A.weight"] == [4, 32]
    assert shapes[prefix + "v_proj.lora_B.weight"] == [2 * 8, 4]
    assert len(shapes) == 2 * 2 * 2
