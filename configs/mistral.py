"""Mistral-7B DeRTa, full parameter, with the paper's 8B/7B hyperparameters.

    python -m derta_jax.convert --hf /path/Mistral-7B-v0.1 --out models/mistral-7b
    python -m derta_jax.train --config=configs/mistral.py:7b --workdir runs/mistral-7b-derta

Variant `7b[,recipe]`. The 8B protocol of configs/llama3.py: lr 2e-5 cosine, warmup 0.03, wd 2e-5
on every tensor, 128 examples per step (16 micro-batches), 2 epochs, max len 1024, the official
refusal-token dropout (ceil(L/20) positions per row); the 4096-token sliding window comes from the
checkpoint's config.
Expected outcome: attack success rates near the paper's Mistral-7B DeRTa row (Table 2).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import llama3  # noqa: E402

from derta_jax.training.config import base_config  # noqa: E402


def get_config(arg=None):
    variant, recipe = llama3.parse(arg, "7b")
    if variant != "7b":
        raise ValueError(f"configs/mistral.py variant {variant!r}: expected '7b'")
    c = llama3.paper_defaults(base_config(), "models/mistral-7b", recipe, "mistral-7b")
    c = llama3.full_parameter(c)
    # 16 micro-batches of 8 rows, so that a step fits one node of 8 x H100 80 GB (`python -m
    # derta_jax.plan --topology h100-8`, an XLA:CPU estimate: 55.83 GiB per GPU; with 1, 460.75).
    c.train.accum_steps = 16
    return c
