"""Prints training examples as the trainer sees them, token by token with their masks.

    python -m derta_jax.data.inspect --config=configs/smollm2.py [--config.data.template=chat ...] [--n 3]

Builds the run's examples exactly as `python -m derta_jax.train` does (same config, sources,
template and tokenizer; token cuts drawn as in epoch 0) and prints the first `--n`: one line per
position with the token, `L` where the position carries loss, `R` where its target is the
refusal id, and the target it is trained to predict. On a terminal, supervised tokens are green
and RTO ones red. Check the masks here before paying for a run.
"""
from __future__ import annotations

import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from derta_jax import cli
from derta_jax.data import loader
from derta_jax.data.tokenize import TokenizedExample, materialize

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:variant]", lock_config=True)
_N = flags.DEFINE_integer("n", 3, "how many examples to print")
_COLOURS = {"L": "\033[32m", "R": "\033[31m"}
_RESET = "\033[0m"


def format_example(example: TokenizedExample, index: int, tokenizer: Any, max_length: int,
                   seed: int, colour: bool = False) -> str:
    """One example as the trainer sees it: a header, then a line per position."""
    k = loader.draw_cut(example, seed, 0, index)
    a = materialize(example, max_length, k)
    kind = "RTO" if example.is_rto else "MLE"
    lines = [f"example {index}: {len(a['tokens'])} tokens, {kind}, {int(a['loss_mask'].sum())} with "
             f"loss, {int(a['rto_mask'].sum())} RTO" + (f", harmful cut k={k}" if example.cut_len else ""),
             f"{'pos':>5} {'id':>7}  {'token':<24} mask  target"]
    for t, (tok, target) in enumerate(zip(a["tokens"].tolist(), a["targets"].tolist())):
        mask = "R" if a["rto_mask"][t] else "L" if a["loss_mask"][t] else "."
        shown = repr(tokenizer.decode([tok]))
        line = f"{t:>5} {tok:>7}  {shown:<24} {mask:^4}"
        line = line + f"  {tokenizer.decode([target])!r}" if mask != "." else line.rstrip()
        lines.append(f"{_COLOURS[mask]}{line}{_RESET}" if colour and mask != "." else line)
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from derta_jax.training import config as config_lib, loop  # heavy: after the flags parse

    with cli.user_errors(cli.USER_ERRORS + (OSError,)):  # a tokenizer folder's OSError too
        run = config_lib.parse(_CONFIG.value)
        _, tokenizer = loop.model_and_tokenizer(run)
        examples = loop.load_examples(run.data, tokenizer)
    colour = sys.stdout.isatty()
    for i, example in enumerate(examples[:_N.value]):
        print(format_example(example, i, tokenizer, run.data.max_length, run.data.seed, colour) + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_absl_flags)
