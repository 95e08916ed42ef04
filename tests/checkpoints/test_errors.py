"""Every conversion error names what is wrong (tensor, file or value)."""
import json
import re
import shutil

import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from derta_jax.checkpoints.gguf import load_gguf
from derta_jax.checkpoints.hf import load_hf
from derta_jax.checkpoints.model_dir import save_model_dir
from derta_jax.checkpoints.resolve import resolve_checkpoint
from tests.conftest import run_module


def _rewrite(src, dst, edit):
    """Copies a single-file checkpoint, passing its tensors dict through `edit`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    with safe_open(src / "model.safetensors", "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), dst / "model.safetensors")
    return dst


def test_pickle_weights_refused(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    shutil.copy(folder / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors or GGUF only"):
        load_hf(tmp_path, progress=False)


def test_missing_tensor_named(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _rewrite(folder, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=r"missing tensors.*" + re.escape(name)):
        load_hf(bad, progress=False)


def test_missing_expert_named(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("mixtral")
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    bad = _rewrite(folder, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=r"missing tensors.*" + re.escape(name)):
        load_hf(bad, progress=False)


def test_unexpected_tensor_named(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    name = "model.layers.0.self_attn.q_norm.weight"
    bad = _rewrite(folder, tmp_path / "bad", lambda t: {**t, name: t["model.norm.weight"]})
    with pytest.raises(ValueError, match=r"unexpected tensors.*" + re.escape(name)):
        load_hf(bad, progress=False)


def test_shape_mismatch_names_tensor_and_shapes(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    shutil.copytree(folder, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 40  # the files hold 48
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' in "
                       r"model\.safetensors has shape \[\d+, \d+\], expected \[\d+, \d+\]"):
        load_hf(tmp_path / "bad", progress=False)


def test_unsupported_model_type_named(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    shutil.copytree(folder, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen2"
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model_type 'qwen2'"):
        load_hf(tmp_path / "bad", progress=False)


def test_missing_shard_of_the_index_is_named(hf_checkpoint, tmp_path):
    _, model = hf_checkpoint("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=re.escape(shard.name)):
        load_hf(tmp_path, progress=False)


def test_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf(tmp_path, progress=False)


def test_tied_checkpoint_with_lm_head_copy_is_accepted(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama_tied")
    ok = _rewrite(folder, tmp_path / "ok",
                  lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    _, params = load_hf(ok, progress=False)
    assert "lm_head" not in params


def _cut(src, dst, size):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def test_truncated_gguf_says_so_with_expected_and_actual_size(smollm2_gguf, tmp_path):
    full = smollm2_gguf.stat().st_size
    cut = _cut(smollm2_gguf, tmp_path / "cut.gguf", full // 2)
    with pytest.raises(ValueError, match=rf"cut\.gguf is truncated: its tensors need {full} bytes, "
                                         rf"the file has {full // 2}"):
        load_gguf(cut, progress=False)
    head = _cut(smollm2_gguf, tmp_path / "head.gguf", 1000)
    with pytest.raises(ValueError, match=r"head\.gguf is not a readable GGUF file \(damaged or "
                                         r"truncated header, 1000 bytes\)"):
        load_gguf(head, progress=False)


def test_convert_cli_user_errors_are_one_line_exit_2(smollm2_gguf, tmp_path):
    cut = _cut(smollm2_gguf, tmp_path / "cut.gguf", 10_000_000)
    cases = {("--gguf", str(cut)): "cut.gguf is truncated",
             ("--hf", str(tmp_path / "nowhere")): "Hugging Face folder not found: "}
    for args, message in cases.items():
        run = run_module("derta_jax.convert", *args, "--out", str(tmp_path / "m"))
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def saved_model_dir(hf_checkpoint, tmp_path_factory):
    folder, _ = hf_checkpoint("llama")
    cfg, params = load_hf(folder, progress=False)
    return save_model_dir(tmp_path_factory.mktemp("md") / "model", cfg, params, None)


@pytest.mark.parametrize("change, message", [
    ({"intermediate_size": 40}, r"tensor layers_0/mlp/gate_proj/kernel in .*params has shape "
                                r"\[32, 48\], expected \[32, 40\] from the model config"),
    ({"num_layers": 3}, r"params has no tensor for layers_2/input_norm/scale"),
    ({"num_layers": 1}, r"params has tensor layers_1/attn/k_proj/kernel \[32, 2, 8\], which the "
                        r"model config does not have \(num_layers=1"),
    ({"tie_word_embeddings": True}, r"params has tensor lm_head/kernel \[32, 96\], which the model "
                                    r"config does not have"),
])
def test_model_dir_params_that_disagree_with_the_config_name_the_first_tensor(
        saved_model_dir, tmp_path, change, message):
    md = tmp_path / "md"
    shutil.copytree(saved_model_dir, md)
    config = json.loads((md / "model_config.json").read_text())
    (md / "model_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        resolve_checkpoint(md)
