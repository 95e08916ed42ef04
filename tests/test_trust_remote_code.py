"""No entry point runs code from a model or data folder, nor asks whether to (issue 13, item 4)."""
import ast
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from derta_jax.checkpoints.model_dir import load_tokenizer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "derta_jax"


@pytest.fixture
def hostile(llama3_tokenizer_dir, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """(folder, marker): real tokenizer files whose tokenizer_config.json maps AutoTokenizer to
    a class in the folder's own evil.py, which creates `marker` when imported."""
    folder, marker = tmp_path / "hostile", tmp_path / "code_ran"
    folder.mkdir()
    for f in llama3_tokenizer_dir.glob("tokenizer*.json"):
        shutil.copy(f, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder, marker


def _run_saying_yes(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run([sys.executable, "-m", *args], input="y\n", capture_output=True,
                          text=True, env=env, timeout=300)


def _assert_refused(run: subprocess.CompletedProcess, marker: pathlib.Path) -> None:
    assert not marker.exists(), "code from the folder ran"
    assert "[y/N]" not in run.stdout + run.stderr
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "which derta_jax never runs" in run.stderr


def test_convert_hf_and_data_build_never_run_a_tokenizer_folders_code(hostile, hf_checkpoint,
                                                                      tmp_path):
    folder, marker = hostile
    hf_folder, _ = hf_checkpoint("llama")
    _assert_refused(_run_saying_yes(tmp_path, "derta_jax.convert", "--hf", str(hf_folder),
                                    "--tokenizer", str(folder), "--out", str(tmp_path / "m")),
                    marker)
    _assert_refused(_run_saying_yes(tmp_path, "derta_jax.data.build", "--recipe", "derta",
                                    "--safety", "demo", "--helpful", "demo", "--template", "chat",
                                    "--tokenizer", str(folder), "--out", str(tmp_path / "d.jsonl")),
                    marker)


def test_convert_gguf_never_runs_code_next_to_the_file(hostile, smollm2_gguf, tmp_path):
    folder, marker = hostile
    (folder / "model.gguf").symlink_to(smollm2_gguf)
    _assert_refused(_run_saying_yes(tmp_path, "derta_jax.convert", "--gguf",
                                    str(folder / "model.gguf"), "--out", str(tmp_path / "m")),
                    marker)


def test_model_dir_tokenizer_never_runs_code(hostile, monkeypatch):
    folder, marker = hostile
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with pytest.raises(ValueError, match="auto_map.*never runs"):
        load_tokenizer(folder)
    assert not marker.exists()


def _from_pretrained_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                calls.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node))
    return calls


def test_every_from_pretrained_in_the_package_passes_trust_remote_code_false():
    calls = _from_pretrained_calls()
    assert calls, "no from_pretrained call found: is PACKAGE right?"
    unsafe = [where for where, call in calls
              if not any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
                         and k.value.value is False for k in call.keywords)]
    assert not unsafe, f"from_pretrained without trust_remote_code=False: {unsafe}"
