"""derta_jax/cli.py: every entry point's usage and user errors are one line on stderr, exit 2."""
import re

import pytest

from derta_jax import cli
from tests.conftest import run_module


@pytest.mark.parametrize("module, args, message", [
    ("derta_jax.convert", ["--hf", "x", "--out", "y", "--dtype", "float16"],
     r"error: argument --dtype: invalid choice: 'float16' \(choose from '?float32'?, "
     r"'?bfloat16'?\)"),  # quoted before Python 3.12.8
    ("derta_jax.data.build", ["--recipe", "derta", "--safety", "demo", "--helpful", "demo",
                              "--out", "o.jsonl", "--rto-count", "many"],
     r"error: argument --rto-count: invalid int value: 'many'"),
    ("derta_jax.export", ["--checkpoint", "x", "--out", "y", "--step", "last"],
     r"error: argument --step: invalid int value: 'last'"),
])
def test_a_bad_flag_value_is_one_stderr_line_with_exit_code_2(tmp_path, module, args, message):
    proc = run_module(module, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and re.fullmatch(message + "\n", proc.stderr), \
        proc.stderr
    assert proc.stdout == "" and not (tmp_path / "o.jsonl").exists()


def test_user_errors_are_one_line_and_others_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as e, cli.user_errors():
        raise FileNotFoundError("no such file:\n  data.jsonl")
    assert e.value.code == 2 and capsys.readouterr().err == "error: no such file: data.jsonl\n"
    with pytest.raises(KeyError), cli.user_errors():
        raise KeyError("a bug")
