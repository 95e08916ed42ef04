"""`python -m derta_jax.train`: a user error is one line on stderr naming the file, exit code 2."""
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_a_bad_input_file_is_one_line_naming_it_with_exit_code_2(tmp_path):
    bad = tmp_path / "safety.jsonl"
    bad.write_text('{"query": \n')
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "derta_jax.train", "--config=configs/tiny.py",
                             f"--config.data.safety={bad}", f"--workdir={tmp_path / 'run'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:1: ") and "JSON" in last
    assert not (tmp_path / "run" / "lock").exists()
