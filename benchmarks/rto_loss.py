"""Vectorised RTO (one forward over q + r̂) vs the literal loop (one forward per position of r̂).

    python -m benchmarks.rto_loss [--lengths 64 256]

Both compute mean_t -log p(refusal | q, r̂<t) with the same small decoder; the loop pads every
context to the full length so it compiles once. Prints both times, their ratio, and the two
losses (equal to float32 precision).
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder, init_variables, lm_head_weight
from derta_jax.training import loss as loss_lib

REFUSAL = 7
QUERY = 32


def model_config() -> ModelConfig:
    return ModelConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                       rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,))


def measure(params, cfg: ModelConfig, r_len: int) -> dict:
    n = QUERY + r_len
    seq = np.random.default_rng(r_len).integers(3, cfg.vocab_size, n).astype(np.int32)
    positions = np.arange(n, dtype=np.int32)[None]
    mask = (np.arange(n) >= QUERY - 1) & (np.arange(n) < n - 1)
    batch = {"tokens": seq[None], "targets": np.full((1, n), REFUSAL, np.int32),
             "loss_mask": mask[None], "rto_mask": mask[None],
             "segment_ids": np.ones((1, n), np.int32), "positions": positions}
    model = Decoder(cfg)

    @jax.jit
    def vectorised(params):
        hidden, _ = model.apply({"params": params}, batch["tokens"], positions,
                                batch["segment_ids"], return_hidden=True)
        return loss_lib.derta_loss(hidden, lm_head_weight(params, cfg), batch,
                                   loss_lib.LossConfig(rto_keep=1.0, chunk_size=128),
                                   jax.random.PRNGKey(0))[0]

    @jax.jit
    def one_position(params, end):
        valid = (jnp.arange(n) < end)[None]
        logits, _ = model.apply({"params": params}, jnp.where(valid, seq[None], 0), positions,
                                valid.astype(jnp.int32))
        return -jax.nn.log_softmax(logits[0, end - 1])[REFUSAL]

    def literal(params):
        return jnp.mean(jnp.stack([one_position(params, QUERY + t) for t in range(r_len)]))

    t_vec, l_vec = common.timed(lambda: jax.block_until_ready(vectorised(params)), repeats=3)
    t_lit, l_lit = common.timed(lambda: jax.block_until_ready(literal(params)))
    return {"r_hat_len": r_len, "vectorised_s": round(t_vec, 4), "literal_loop_s": round(t_lit, 3),
            "speedup": round(t_lit / t_vec, 1), "loss_vectorised": float(l_vec),
            "loss_literal": float(l_lit)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    args = p.parse_args()
    cfg = model_config()
    params = init_variables(cfg, jax.random.PRNGKey(0))["params"]
    print(json.dumps([measure(params, cfg, r) for r in args.lengths], indent=1))


if __name__ == "__main__":
    main()
