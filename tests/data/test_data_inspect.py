"""`python -m derta_jax.data.inspect` prints the trainer's examples token by token with their masks."""
import pathlib
import subprocess
import sys

from derta_jax.data import inspect, recipe, templates
from derta_jax.data.tokenize import build_examples

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How?"}]


def test_each_position_shows_its_masks_and_target(llama3):
    triple = {"messages": CHAT, "harmful_response": "Do it.", "safe_response": "No.", "id": "x:1"}
    recs = recipe.rto_records([triple], templates.make_template("chat", llama3))
    (ex,), _ = build_examples(recs, llama3, 64, refusal_id=19701, template_kind="chat")
    text = inspect.format_example(ex, 0, llama3, 64, seed=0)
    lines = text.splitlines()
    assert lines[0] == f"example 0: {len(ex.tokens)} tokens, RTO, 7 with loss, 4 RTO"
    marked = [(line.split()[0], line.split()[-2], line.split()[-1]) for line in lines[2:] if len(line.split()) > 4]
    assert marked == [("10", "L", "'Hello'"), ("11", "L", "'!'"), ("12", "L", "'<|eot_id|>'"),  # earlier turn
                      ("24", "R", "'Sorry'"), ("25", "R", "'Sorry'"), ("26", "R", "'Sorry'"), ("27", "R", "'Sorry'")]
    assert lines[2 + 28].split() == ["28", "128009", "'<|eot_id|>'", "."]  # the last position never has loss
    assert "\033[" not in text and "\033[31m" in inspect.format_example(ex, 0, llama3, 64, 0, colour=True)


def test_cli_prints_the_config_examples_without_colour_off_a_terminal(llama3_tokenizer_dir):
    out = subprocess.run([sys.executable, "-m", "derta_jax.data.inspect", "--config=configs/tiny.py", "--n", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("example ") == 2 and "\033[" not in out.stdout
    bad = subprocess.run([sys.executable, "-m", "derta_jax.data.inspect", "--config=configs/tiny.py",
                          "--config.data.safety=nope.jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: safety file not found: nope.jsonl"
