"""What export refuses, and how it says so."""
import json
import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from derta_jax import export
from derta_jax.checkpoints.resolve import resolve_checkpoint
from tests.conftest import run_module


def fake_workdir(root: pathlib.Path, model_dir: pathlib.Path, steps: list[int]) -> pathlib.Path:
    (root / "model").mkdir(parents=True)
    shutil.copy(model_dir / "model_config.json", root / "model")
    for step in steps:
        (root / "checkpoints" / str(step) / "state").mkdir(parents=True)
    (root / "checkpoints").mkdir(exist_ok=True)
    return root


def test_missing_step_lists_the_available_ones(model_dir, tmp_path):
    root = fake_workdir(tmp_path / "run", model_dir("llama"), [10, 30, 20])
    with pytest.raises(ValueError, match=r"no checkpoint for step 25; available steps: 10, 20, 30"):
        export.main(["--checkpoint", str(root), "--step", "25", "--out", str(tmp_path / "out")])
    empty = fake_workdir(tmp_path / "empty", model_dir("llama"), [])
    with pytest.raises(ValueError, match=r"has no finished checkpoint in checkpoints/"):
        resolve_checkpoint(empty)


def test_a_step_only_applies_to_a_workdir(model_dir):
    with pytest.raises(ValueError, match=r"is a model dir; a step only applies"):
        resolve_checkpoint(model_dir("llama"), step=3)


def test_paths_that_are_not_our_checkpoints_say_what_they_are(hf_checkpoint, model_dir, tmp_path):
    hf_folder, _ = hf_checkpoint("llama")
    with pytest.raises(ValueError, match=r"is a Hugging Face checkpoint; convert it first"):
        resolve_checkpoint(hf_folder)
    with pytest.raises(ValueError, match=r"not a derta_jax checkpoint: it does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not a derta_jax checkpoint: expected a model dir"):
        resolve_checkpoint(tmp_path)
    no_params = tmp_path / "no_params"
    no_params.mkdir()
    shutil.copy(model_dir("llama") / "model_config.json", no_params)
    with pytest.raises(ValueError, match=r"model dir without params/"):
        resolve_checkpoint(no_params)
    # An Orbax checkpoint of something else under a workdir layout.
    other = fake_workdir(tmp_path / "other", model_dir("llama"), [])
    ocp.PyTreeCheckpointer().save(other / "checkpoints" / "4" / "state",
                                  {"params": {"w": np.zeros(3, np.float32)}})
    with pytest.raises(ValueError,
                       match=r"checkpoints/4/state has no tensor for embed_tokens/embedding"):
        resolve_checkpoint(other)
    broken = fake_workdir(tmp_path / "broken", model_dir("llama"), [7])
    with pytest.raises(ValueError, match=r"checkpoints/7/state is not a readable Orbax checkpoint"):
        resolve_checkpoint(broken)


@pytest.mark.parametrize("change, message", [
    ({"intermediate_size": 40}, r"layers_0/mlp/gate_proj/kernel .* has shape \[32, 48\], "
                                r"expected \[32, 40\]"),
    ({"num_layers": 1}, r"params has tensor layers_1/attn/k_proj/kernel \[32, 2, 8\], which the "
                        r"model config does not have"),
    ({"tie_word_embeddings": True}, r"params has tensor lm_head/kernel \[32, 96\], which the model "
                                    r"config does not have"),
])
def test_params_disagreeing_with_the_config_name_the_first_tensor(model_dir, tmp_path, change,
                                                                  message):
    md = tmp_path / "md"
    shutil.copytree(model_dir("llama"), md)
    config = json.loads((md / "model_config.json").read_text())
    (md / "model_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        resolve_checkpoint(md)


def test_unsupported_dtype_lora_flag_and_shard_size_are_refused(model_dir, tmp_path):
    md = str(model_dir("llama"))
    with pytest.raises(ValueError, match=r"unsupported dtype 'float16'; supported: float32, bfloat16"):
        export.main(["--checkpoint", md, "--out", str(tmp_path / "a"), "--dtype", "float16"])
    with pytest.raises(ValueError, match=r"has no LoRA adapters to merge"):
        export.main(["--checkpoint", md, "--out", str(tmp_path / "b"), "--merge-lora"])
    with pytest.raises(ValueError, match=r"max shard size '5 gigs'"):
        export.main(["--checkpoint", md, "--out", str(tmp_path / "c"), "--max-shard-size", "5 gigs"])


def test_non_empty_output_needs_overwrite(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00007-of-00009.safetensors").write_text("stale")
    (out / "notes.txt").write_text("keep me")
    md = str(model_dir("llama"))
    with pytest.raises(ValueError, match=r"output folder .*out is not empty; pass --overwrite"):
        export.main(["--checkpoint", md, "--out", str(out)])
    export.main(["--checkpoint", md, "--out", str(out), "--overwrite"])
    assert not (out / "model-00007-of-00009.safetensors").exists()
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "model-00001-of-00001.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/nowhere"], "is not a derta_jax checkpoint: it does not exist"),
    (["--checkpoint", "{md}", "--dtype", "float16"], "unsupported dtype 'float16'"),
])
def test_cli_user_errors_are_one_line_exit_2(model_dir, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, md=model_dir("llama")) for a in args]
    proc = run_module("derta_jax.export", *args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
