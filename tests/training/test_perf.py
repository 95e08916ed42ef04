"""perf: FLOPs per token against the formula written out, and the peak as the fastest matmul."""

from derta_jax.models.config import ModelConfig
from derta_jax.training import perf


def test_peak_is_the_fastest_timed_matmul(monkeypatch):
    # perf_counter is read at the start and end of each timed call: durations 2 s, 0.5 s, 1 s.
    clock = iter([0.0, 2.0, 10.0, 10.5, 20.0, 21.0])
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
    assert perf.measure_matmul_flops(n=64, repeats=3) == 2.0 * 64 ** 3 / 0.5


def test_train_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    per_layer = 32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64  # q, k+v, o, gate/up/down
    n = 2 * per_layer + 100 * 32  # + the LM head (tied: the embedding used as a matmul)
    assert perf.train_flops_per_token(cfg, 16) == 6 * n + 12 * 2 * 4 * 8 * 16
