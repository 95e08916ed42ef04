"""Tiny models and random DeRTa batches shared by the training tests."""
import numpy as np

from derta_jax.models.config import ModelConfig

REFUSAL = 5


def tiny_model(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=128, bos_token_id=1,
                eos_token_ids=(2,), rope_theta=10000.0)
    return ModelConfig(**{**base, **overrides})


def random_batch(rows: int, length: int, seed: int, vocab: int = 64) -> dict[str, np.ndarray]:
    """Rows packed with 1-3 examples: a prompt (no loss) then a response, MLE or RTO."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((rows, length), np.int32) for k in ("tokens", "targets", "segment_ids",
                                                          "positions")}
    out["loss_mask"] = np.zeros((rows, length), bool)
    out["rto_mask"] = np.zeros((rows, length), bool)
    for r in range(rows):
        start = 0
        for seg in range(1, rng.integers(1, 4) + 1):
            n = int(rng.integers(4, length // 2))
            if start + n > length:
                break
            sl = slice(start, start + n)
            toks = rng.integers(3, vocab, n + 1)
            out["tokens"][r, sl] = toks[:-1]
            out["targets"][r, sl] = toks[1:]
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            q = int(rng.integers(1, n - 1))
            out["loss_mask"][r, start + q:start + n] = True
            if rng.random() < 0.5:
                out["rto_mask"][r, start + q:start + n] = True
                out["targets"][r, start + q:start + n] = REFUSAL
            start += n
    return out


def poison_grads(monkeypatch, rngs) -> None:
    """Makes the train step's gradients NaN, its loss staying finite, when the step's rng is one
    of `rngs`: a diverging step that the loss alone does not show (what issue 13 saw saved)."""
    import jax
    import jax.numpy as jnp

    from derta_jax.training import step as step_lib

    real = step_lib.compute_grads
    keys = np.stack([np.asarray(jax.device_get(k)) for k in rngs])

    def compute_grads(state, batch, rng, *, cfg):
        grads, sums = real(state, batch, rng, cfg=cfg)
        hit = jnp.any(jnp.all(jnp.asarray(keys) == rng, axis=-1))
        return jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads), sums

    monkeypatch.setattr(step_lib, "compute_grads", compute_grads)


def loop_rng(seed: int, step: int):
    """The rng that training/loop.py gives step `step` (1-based) of a run with train.seed=seed."""
    import jax
    return jax.random.fold_in(jax.random.PRNGKey(seed), step - 1)
