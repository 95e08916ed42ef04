"""A tiny random LLaMA-shaped model on the bundled demo data: for tests and smoke runs (seconds).

    python -m derta_jax.train --config=configs/tiny.py --workdir /tmp/tiny

Uses the LLaMA-3 tokenizer fixture (../shared/fixtures/llama3-tokenizer) with tied embeddings of
width 32; 30 steps lower both loss/mle and loss/rto well below their starting values (~11.8).
"""
import json
import pathlib

from derta_jax.training.config import base_config

TOKENIZER = pathlib.Path(__file__).resolve().parents[1].parent / "shared/fixtures/llama3-tokenizer"
ARCH = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True)


def get_config(arg=None):
    c = base_config()
    c.model.init = "random"
    c.model.preset = "llama3-8b"
    c.model.arch_overrides = json.dumps(ARCH)
    c.model.tokenizer = str(TOKENIZER)
    c.model.dtype = "float32"
    c.data.max_length = 128
    c.data.helpful_count = 64
    c.data.rto_count = 32
    c.data.prefix_count = 32
    c.loss.chunk_size = 64
    c.optimizer.learning_rate = 1e-2
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_ratio = 0.0
    c.train.batch_size = 8
    c.train.steps = 30
    c.checkpoint.every_steps = 10
    c.train.peak_tflops = 1.0
    return c
