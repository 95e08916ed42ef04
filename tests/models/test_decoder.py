"""Invariants of the decoder: KV cache, causality, padding, sliding window, packing, layouts, LoRA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.models import attention
from derta_jax.models.cache import init_cache
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder, init_variables, lm_head_weight
from derta_jax.models.layout import stack_layers, unstack_layers
from derta_jax.models.lora import merge_lora

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,))
MOE = TINY.replace(model_type="mixtral", num_experts=4)
L = 12


def _run(cfg, variables, tokens, positions=None, segments=None, **kw):
    tokens = jnp.asarray(tokens)
    B, n = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(n), (B, n)) if positions is None else jnp.asarray(positions)
    segments = jnp.ones((B, n), jnp.int32) if segments is None else jnp.asarray(segments)
    return _apply(cfg)(variables, tokens, positions, segments, **kw)


@functools.cache
def _apply(cfg):
    return jax.jit(Decoder(cfg).apply, static_argnames=("return_hidden", "deterministic"))


def _tokens(batch=2, n=L, seed=0):
    return np.random.default_rng(seed).integers(3, TINY.vocab_size, (batch, n))


@pytest.fixture(scope="module")
def dense():
    return init_variables(TINY, jax.random.key(0))


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(scan_layers=True), MOE, TINY.replace(attention_block=4)],
                         ids=["dense", "scan", "moe", "cache read in blocks of 4"])
def test_cached_decoding_equals_full_forward(cfg):
    variables = init_variables(cfg.replace(scan_layers=False), jax.random.key(1))
    if cfg.scan_layers:
        variables = {"params": stack_layers(variables["params"])}
    tokens = _tokens()
    full, _ = _run(cfg, variables, tokens)
    prefill = 5
    cache = init_cache(cfg, batch=2, max_len=16)
    logits, aux = _run(cfg, variables, tokens[:, :prefill], cache=cache)
    steps = [logits]
    for t in range(prefill, L):
        logits, aux = _run(cfg, variables, tokens[:, t:t + 1], positions=jnp.full((2, 1), t),
                           cache=aux["cache"])
        steps.append(logits)
    assert int(aux["cache"]["index"]) == L
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def _literal_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(Dh), masked) v in float64, the query heads of a KV head sharing it:
    q [B, L, H, Dh], k/v [B, K, S, Dh] head-major, mask [B, 1, L, S]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [B, H, S, Dh]
    scores = np.einsum("blhd,bhsd->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bhsd->blhd", probs, v)


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("filled", [3, 4, 5, 9, 16])
def test_cached_attention_in_blocks_reads_only_the_filled_slots(L, filled):
    """Blocks of 4 over a 16-slot cache, `filled` slots written (the last L of them the queries'
    own): the literal masked softmax, and blocks past the filled ones (NaN here) are never read."""
    rng = np.random.default_rng(filled * 10 + L)
    B, H, K, S, Dh = 2, 4, 2, 16, 8
    q = rng.standard_normal((B, L, H, Dh)).astype(np.float32)
    k = rng.standard_normal((B, K, S, Dh)).astype(np.float32)
    v = rng.standard_normal((B, K, S, Dh)).astype(np.float32)
    slot = np.arange(S)
    query_slot = filled - L + np.arange(L)  # the queries' own slots: causal within the cache
    mask = (slot[None, :] <= query_slot[:, None]) & (rng.random((B, 1, 1, S)) < 0.7)
    mask |= slot[None, :] == query_slot[:, None]  # every query sees at least itself
    want = _literal_attention(q, k, v, mask)
    read = -(-filled // 4) * 4  # whole blocks: the last one may hold unwritten (zero) slots
    k[:, :, read:] = np.nan
    v[:, :, read:] = np.nan
    for block in (4, 0):  # 0: one read of all slots, NaN included where masked
        got = attention.cached_attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                      jnp.int32(filled), block)
        if block == 0 and read < S:
            assert np.isnan(np.asarray(got)).any()  # the check above can see a read past the blocks
            continue
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_a_token_changes_only_the_logits_from_its_position_on(dense):
    tokens = _tokens(batch=1)
    changed = tokens.copy()
    changed[0, 7] = (changed[0, 7] + 1) % TINY.vocab_size
    a, _ = _run(TINY, dense, tokens)
    b, _ = _run(TINY, dense, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.all(np.max(np.abs(a[0, 7:] - b[0, 7:]), axis=-1) > 1e-4)


def test_left_padding_does_not_change_real_tokens(dense):
    tokens = _tokens(batch=1, n=8)
    pad = 4
    padded = np.concatenate([np.zeros((1, pad), np.int64), tokens], axis=1)
    positions = np.concatenate([np.zeros((1, pad)), np.arange(8)[None]], axis=1)
    segments = np.concatenate([np.zeros((1, pad)), np.ones((1, 8))], axis=1)
    plain, _ = _run(TINY, dense, tokens)
    ours, _ = _run(TINY, dense, padded, positions, segments)
    np.testing.assert_allclose(ours[:, pad:], plain, atol=1e-5, rtol=1e-5)


def test_sliding_window_changes_outputs_exactly_beyond_the_window(dense):
    window = 5
    tokens = _tokens(batch=1)
    full, _ = _run(TINY, dense, tokens)
    windowed, _ = _run(TINY.replace(sliding_window=window), dense, tokens)
    np.testing.assert_array_equal(windowed[:, :window], full[:, :window])
    assert np.all(np.max(np.abs(windowed[0, window:] - full[0, window:]), axis=-1) > 1e-4)
    # A window as long as the sequence changes nothing.
    long_window, _ = _run(TINY.replace(sliding_window=L), dense, tokens)
    np.testing.assert_array_equal(long_window, full)


@pytest.mark.parametrize("block", [0, 4], ids=["full", "blocked"])
def test_packed_segments_do_not_see_each_other(dense, block):
    a, b = _tokens(batch=1, n=5, seed=1), _tokens(batch=1, n=7, seed=2)
    packed = np.concatenate([a, b], axis=1)
    positions = np.concatenate([np.arange(5), np.arange(7)])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    ours, _ = _run(TINY.replace(attention_block=block), dense, packed, positions, segments)
    alone_a, _ = _run(TINY, dense, a)
    alone_b, _ = _run(TINY, dense, b)
    np.testing.assert_allclose(ours[:, :5], alone_a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours[:, 5:], alone_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_blocked_attention_gives_the_full_kernel_logits_and_grads(dense, window):
    """Query blocks that skip the keys after them (attention_block) equal the full [L, L]
    kernel on packed rows with padding, segments crossing block edges, and a sliding window."""
    lengths = [[3, 6, 4, 2], [9, 5]]  # row 1 ends in padding; segments straddle blocks of 5
    tokens, positions, segments = (np.zeros((2, 16), np.int32) for _ in range(3))
    for r, row in enumerate(lengths):
        offset = 0
        for s, n in enumerate(row, start=1):
            tokens[r, offset:offset + n] = _tokens(1, n, seed=10 * r + s)[0]
            positions[r, offset:offset + n] = np.arange(n)
            segments[r, offset:offset + n] = s
            offset += n

    def loss(p, c):
        logits, _ = _run(c, {"params": p}, tokens, positions, segments)
        return jnp.mean(jnp.where(segments > 0, jax.nn.logsumexp(logits, axis=-1), 0.0))

    base = TINY.replace(sliding_window=window, attention_impl="xla")
    want, want_grad = jax.value_and_grad(loss)(dense["params"], base.replace(attention_block=0))
    got, got_grad = jax.value_and_grad(loss)(dense["params"], base.replace(attention_block=5))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4), got_grad, want_grad)


@pytest.mark.parametrize("runtime", [dict(remat="full"), dict(scan_layers=True, remat="dots")])
def test_scan_and_remat_give_the_plain_logits_and_grads(runtime):
    variables = init_variables(MOE, jax.random.key(2))
    tokens = _tokens()
    cfg = MOE.replace(**runtime)
    params = stack_layers(variables["params"]) if cfg.scan_layers else variables["params"]

    def loss(p, c):
        logits, aux = _run(c, {"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)) + aux["router_loss"]

    want, want_grad = jax.value_and_grad(loss)(variables["params"], MOE)
    got, got_grad = jax.value_and_grad(loss)(params, cfg)
    if cfg.scan_layers:
        got_grad = unstack_layers(got_grad)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4), got_grad, want_grad)


def test_unstack_layers_inverts_stack_layers(dense):
    stacked = stack_layers(dense["params"])
    assert stacked["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 8)
    back = unstack_layers(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, dense["params"])
    with pytest.raises(ValueError, match="layers_0..layers_0"):
        stack_layers({"layers_1": {}})


@pytest.mark.parametrize("base", [TINY, MOE], ids=["dense", "moe"])
def test_lora_zero_b_is_the_base_model_and_merge_equals_unmerged(base):
    cfg = base.replace(lora_rank=4, lora_alpha=8.0)
    variables = init_variables(cfg, jax.random.key(3))
    assert all(np.all(x == 0) for p, x in jax.tree_util.tree_leaves_with_path(variables["lora"])
               if "lora_b" in jax.tree_util.keystr(p))
    tokens = _tokens()
    base_logits, _ = _run(base, {"params": variables["params"]}, tokens)
    zero_b, _ = _run(cfg, variables, tokens)
    np.testing.assert_allclose(zero_b, base_logits, atol=1e-6)

    leaves, treedef = jax.tree.flatten(variables["lora"])
    keys = jax.random.split(jax.random.key(4), len(leaves))
    lora = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    unmerged, _ = _run(cfg, {"params": variables["params"], "lora": lora}, tokens)
    merged, _ = _run(base, {"params": merge_lora(variables["params"], lora, cfg)}, tokens)
    assert np.max(np.abs(unmerged - base_logits)) > 1e-2
    np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=1e-5)


def test_lora_dropout_only_when_not_deterministic():
    cfg = TINY.replace(lora_rank=4, lora_dropout=0.5, lora_targets=("q_proj",))
    variables = init_variables(cfg, jax.random.key(5))
    variables["lora"] = jax.tree.map(jnp.ones_like, variables["lora"])
    tokens = _tokens(batch=1)
    a, _ = _run(cfg, variables, tokens)
    b, _ = _run(cfg, variables, tokens)
    c, _ = _run(cfg, variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(c - a)) > 1e-3


def test_lm_head_weight_gives_the_logits(dense):
    tokens = _tokens(batch=1)
    logits, _ = _run(TINY, dense, tokens)
    hidden, _ = _run(TINY, dense, tokens, return_hidden=True)
    np.testing.assert_allclose(hidden @ lm_head_weight(dense["params"], TINY), logits, atol=1e-5)
    tied = TINY.replace(tie_word_embeddings=True)
    tied_vars = init_variables(tied, jax.random.key(6))
    assert "lm_head" not in tied_vars["params"]
    logits, _ = _run(tied, tied_vars, tokens)
    hidden, _ = _run(tied, tied_vars, tokens, return_hidden=True)
    np.testing.assert_allclose(hidden @ lm_head_weight(tied_vars["params"], tied), logits, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(dense):
    tokens = _tokens(batch=1)
    full, _ = _run(TINY, dense, tokens)
    bf16, _ = _run(TINY.replace(dtype="bfloat16"), dense, tokens)
    assert bf16.dtype == jnp.float32
    rel = np.max(np.abs(bf16 - full)) / np.max(np.abs(full))
    assert 0 < rel < 5e-2


def test_attention_impl_is_the_one_asked_for_or_cudnn_for_bf16_on_gpu():
    from derta_jax.models.attention import implementation

    assert implementation(TINY.replace(attention_impl="xla")) == "xla"
    assert implementation(TINY.replace(attention_impl="cudnn")) == "cudnn"
    assert implementation(TINY.replace(dtype="bfloat16")) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        implementation(TINY.replace(attention_impl="flash"))
