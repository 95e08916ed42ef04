"""python -m derta_jax.convert end to end on a tiny checkpoint."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from derta_jax import convert
from derta_jax.checkpoints.hf import load_hf
from derta_jax.checkpoints.model_dir import load_tokenizer
from derta_jax.checkpoints.resolve import resolve_checkpoint


def test_main_writes_a_model_dir(hf_checkpoint, llama3_tokenizer_dir, tmp_path, capsys):
    folder, _ = hf_checkpoint("mistral")
    out = convert.main(["--hf", str(folder), "--out", str(tmp_path / "m"), "--dtype", "bfloat16",
                        "--tokenizer", str(llama3_tokenizer_dir)])
    assert "converted 21 tensors, " in capsys.readouterr().out  # 2 layers x 9 + embed, norm, head
    ckpt = resolve_checkpoint(out)
    cfg, params = ckpt.cfg, ckpt.params_tree()
    ref_cfg, ref = load_hf(folder, dtype="bfloat16", progress=False)
    assert cfg == ref_cfg and cfg.sliding_window == 8
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert load_tokenizer(out)("Sorry", add_special_tokens=False)["input_ids"] == [19701]


def test_missing_tokenizer_is_an_error(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("mistral")
    with pytest.raises(ValueError, match="no tokenizer files.*--tokenizer"):
        convert.main(["--hf", str(folder), "--out", str(tmp_path / "m")])


def test_cli_converts_with_a_progress_bar_and_refuses_pickle(hf_checkpoint, llama3_tokenizer_dir, tmp_path):
    folder, model = hf_checkpoint("llama")
    shutil.copytree(folder, tmp_path / "hf")
    for f in llama3_tokenizer_dir.glob("tokenizer*.json"):
        shutil.copy(f, tmp_path / "hf")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "derta_jax.convert", "--hf", str(tmp_path / "hf"),
                          "--out", str(tmp_path / "m")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"converted 21 tensors, {model.num_parameters():,} params (float32)" in run.stdout
    assert "tensor/s" in run.stderr  # the progress bar
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    run = subprocess.run([sys.executable, "-m", "derta_jax.convert", "--hf", str(tmp_path / "hf"),
                          "--out", str(tmp_path / "m2")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 2 and "safetensors or GGUF only" in run.stderr
