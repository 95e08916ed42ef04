"""training/preference.py against literal formulas (no model, no TRL): random hidden states and LM
head as in test_loss.py. TRL parity with a real model is test_preference_trl.py. The library
functions run under jax.jit (as in the train step; op-by-op dispatch is slower here)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.training import loss as loss_lib
from derta_jax.training import preference
from derta_jax.training.loss import LossConfig

D, V = 8, 13
PAIR_OBJECTIVES = [dict(objective="dpo", beta=0.1),
                   dict(objective="dpo", beta=0.5, label_smoothing=0.2),
                   dict(objective="ipo", beta=0.1),
                   dict(objective="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)]


def np_logps(hidden, w, targets):
    """log-softmax of hidden @ w gathered at the targets, float64."""
    logits = np.einsum("bld,dv->blv", hidden.astype(np.float64), w.astype(np.float64))
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return np.take_along_axis(logp, targets[..., None].astype(np.int64), -1)[..., 0]


def pack(rows, shape):
    """rows: lists of (prompt_len, response_len, hidden [n, D], tokens [n]) sequences, one segment
    each; targets[t] = the next token, loss_mask[t] where that is a response token."""
    B, L = shape
    batch = {k: np.zeros(shape, np.int32)
             for k in ("tokens", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros(shape, bool)
    batch["rto_mask"] = np.zeros(shape, bool)
    hidden = np.zeros((B, L, D), np.float32)
    for b, row in enumerate(rows):
        start = 0
        for seg, (prompt_len, response_len, h, toks) in enumerate(row, 1):
            n = prompt_len + response_len
            assert start + n <= L
            sl = slice(start, start + n)
            batch["tokens"][b, sl] = toks
            batch["targets"][b, start:start + n - 1] = toks[1:]
            batch["loss_mask"][b, start + prompt_len - 1:start + n - 1] = True
            batch["segment_ids"][b, sl] = seg
            batch["positions"][b, sl] = np.arange(n)
            hidden[b, sl] = h
            start += n
    return batch, hidden


def sequence(rng, prompt_len, response_len):
    n = prompt_len + response_len
    return (prompt_len, response_len, rng.normal(size=(n, D)).astype(np.float32),
            rng.integers(0, V, n).astype(np.int32))


def make_pairs(rng, lengths):
    """[(chosen sequence, rejected sequence)] sharing each prompt (its tokens and hidden states)."""
    pairs = []
    for p, c, r in lengths:
        chosen, rejected = sequence(rng, p, c), sequence(rng, p, r)
        rejected = (p, r, np.concatenate([chosen[2][:p], rejected[2][p:]]),
                    np.concatenate([chosen[3][:p], rejected[3][p:]]))
        pairs.append((chosen, rejected))
    return pairs


@pytest.fixture
def head():
    rng = np.random.default_rng(1)
    return rng.normal(size=(D, V)).astype(np.float32), rng.normal(size=(D, V)).astype(np.float32)


@jax.jit
def logps_of(hidden, w, batch):
    return preference.token_logps(hidden, w, batch["targets"], 4)


@functools.partial(jax.jit, static_argnames="cfg")
def pair_sums_and_grad(w, w_ref, hidden, batch, cfg):
    """pair_sums of the policy head `w` (reference head `w_ref`) with inv_pairs = 1 / pair_count,
    and the gradient of `loss` with respect to `w`."""
    ref = logps_of(hidden, w_ref, batch)
    inv_pairs = 1.0 / preference.pair_count(batch)

    def loss(w):
        sums = preference.pair_sums(logps_of(hidden, w, batch), ref, batch, cfg, inv_pairs)
        return sums["loss"], sums

    (_, sums), grad = jax.value_and_grad(loss, has_aux=True)(w)
    return sums, grad


# --- token_logps ------------------------------------------------------------------------------

def _value_and_grads(fn, hidden, w, cot):
    """fn(hidden, w) and the gradients of <fn(hidden, w), cot> with respect to hidden and w."""
    return fn(hidden, w), jax.grad(lambda h, w: (fn(h, w) * cot).sum(), (0, 1))(hidden, w)


@functools.partial(jax.jit, static_argnames="chunk")
def chunked_logps_and_grads(hidden, w, targets, cot, chunk):
    return _value_and_grads(lambda h, w: preference.token_logps(h, w, targets, chunk),
                            hidden, w, cot)


@jax.jit
def full_logps_and_grads(hidden, w, targets, cot):
    def full(h, w):  # all logits at once
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return _value_and_grads(full, hidden, w, cot)


@pytest.mark.parametrize("chunk", [3, 4, 10, 64])
def test_token_logps_match_numpy(chunk, head):
    rng = np.random.default_rng(0)
    B, L = 3, 10  # 10 is a multiple of neither 3 nor 4
    hidden = rng.normal(size=(B, L, D)).astype(np.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    w = head[0]
    cot = rng.normal(size=(B, L)).astype(np.float32)
    ours, grads = chunked_logps_and_grads(hidden, w, targets, cot, chunk)
    assert ours.shape == (B, L) and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, np_logps(hidden, w, targets), rtol=1e-5, atol=1e-6)
    # The chunked, checkpointed gradient equals the gradient of the all-logits-at-once formula.
    for g, g_ref in zip(grads, full_logps_and_grads(hidden, w, targets, cot)[1]):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


# --- pairs ------------------------------------------------------------------------------------

LENGTHS = [(3, 2, 4), (1, 5, 1), (4, 3, 3)]  # (prompt, chosen, rejected)
SHAPE = (3, 20)


def np_pair_losses(lp, ref, batch, pairs_at, cfg):
    """Per-pair losses from the module docstring's formulas, pairs located by (row, segment)."""
    out = []
    for b, seg_c in pairs_at:
        sums = {}
        for name, seg in (("c", seg_c), ("r", seg_c + 1)):
            sel = (batch["segment_ids"][b] == seg) & batch["loss_mask"][b]
            sums[name] = (lp[b][sel].sum(), ref[b][sel].sum(), sel.sum())
        (lp_c, ref_c, n_c), (lp_r, ref_r, n_r) = sums["c"], sums["r"]
        beta, eps = cfg.beta, cfg.label_smoothing
        def smoothed(z):
            return -(1 - eps) * np.log(1 / (1 + np.exp(-z))) - eps * np.log(1 / (1 + np.exp(z)))
        if cfg.objective == "dpo":
            out.append(smoothed(beta * ((lp_c - ref_c) - (lp_r - ref_r))))
        elif cfg.objective == "ipo":
            out.append(((lp_c - ref_c) / n_c - (lp_r - ref_r) / n_r - 1 / (2 * beta)) ** 2)
        else:
            out.append(smoothed(beta * (lp_c / n_c - lp_r / n_r) - cfg.simpo_gamma))
    return np.array(out)


def two_layouts(pairs):
    """The same pairs one per row, and packed: pairs 0 and 1 in row 0, pair 2 in row 1, an empty
    row (one shape [3, 20], so one compilation serves both)."""
    per_row = pack([[c, r] for c, r in pairs], SHAPE)
    packed = pack([[*pairs[0], *pairs[1]], [*pairs[2]], []], SHAPE)
    return per_row, packed


@pytest.mark.parametrize("kw", PAIR_OBJECTIVES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_packed_pairs_match_one_pair_per_row_and_numpy(kw, head):
    cfg = LossConfig(**kw)
    w, w_ref = head
    pairs = make_pairs(np.random.default_rng(2), LENGTHS)
    results = []
    for (batch, hidden), pairs_at in zip(two_layouts(pairs), ([(0, 1), (1, 1), (2, 1)],
                                                             [(0, 1), (0, 3), (1, 1)])):
        assert float(preference.pair_count(batch)) == 3
        sums, grad_w = pair_sums_and_grad(w, w_ref, hidden, batch, cfg)
        expected = np_pair_losses(np_logps(hidden, w, batch["targets"]),
                                  np_logps(hidden, w_ref, batch["targets"]), batch, pairs_at, cfg)
        np.testing.assert_allclose(sums["loss"], expected.mean(), rtol=1e-5)
        np.testing.assert_allclose(sums["pref/loss"], expected.sum(), rtol=1e-5)
        assert set(sums) == {"loss", *preference.SUM_KEYS}
        results.append((sums, grad_w))
    (per_row, g_per_row), (packed, g_packed) = results
    for key in per_row:
        np.testing.assert_allclose(packed[key], per_row[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(g_packed, g_per_row, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", PAIR_OBJECTIVES, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("empty", ["rejected", "chosen"])
def test_pair_without_supervised_tokens_is_not_counted(kw, empty, head):
    """A pair one of whose responses carries no loss (e.g. truncated away) is not a pair: not in
    pair_count, adds nothing to any pair sum, and the mean is over the other pairs."""
    cfg = LossConfig(**kw)
    w, w_ref = head
    pairs = make_pairs(np.random.default_rng(3), LENGTHS)
    batch, hidden = pack([[*pairs[0], *pairs[1]], [*pairs[2]], []], SHAPE)
    alone, hidden_alone = pack([[*pairs[0]], [*pairs[2]], []], SHAPE)
    seg = 4 if empty == "rejected" else 3  # pair 1 of row 0
    batch["loss_mask"][0, batch["segment_ids"][0] == seg] = False
    assert float(preference.pair_count(batch)) == 2

    def sums(batch, hidden):
        return pair_sums_and_grad(w, w_ref, hidden, batch, cfg)[0]

    got, want = sums(batch, hidden), sums(alone, hidden_alone)
    for key in ("loss", "pref/loss", "reward/chosen", "reward/rejected", "reward/correct",
                "count/pairs", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    # ce/mle and count/mle still hold the supervised tokens of the lone response
    assert float(got["count/mle"]) > float(want["count/mle"])


def test_identical_policy_and_reference_give_log2(head):
    """ρ_c = ρ_r = 0: every DPO pair loses exactly log 2, with or without label smoothing."""
    w, _ = head
    pairs = make_pairs(np.random.default_rng(4), LENGTHS)
    for batch, hidden in two_layouts(pairs):
        for kw in PAIR_OBJECTIVES[:2]:  # ε = 0 and 0.2
            # the same head for the policy and the reference: identical log-probs
            sums, _ = pair_sums_and_grad(w, w, hidden, batch, LossConfig(**kw))
            np.testing.assert_allclose(np.float32(sums["loss"]), np.float32(np.log(2)),
                                       rtol=2e-7, atol=0)
            np.testing.assert_allclose(sums["pref/loss"], 3 * np.log(2), rtol=1e-6)
            assert float(sums["reward/chosen"]) == float(sums["reward/rejected"]) == 0.0


# --- constrained SFT --------------------------------------------------------------------------

def test_token_index_and_betas_by_hand():
    # sequence 1: a prompt of 3 tokens and 7 response tokens (targets at positions 2..8); sequence 2
    # of the row: a prompt of 2 and 2 response tokens, its index restarts at 1; then padding
    seg = np.array([[1] * 10 + [2] * 4 + [0] * 2], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0] + [0, 1, 1, 0] + [0, 0]], bool)
    t = jax.jit(preference.token_index)(mask, seg)
    np.testing.assert_array_equal(t, [[0, 0, 1, 2, 3, 4, 5, 6, 7, 0] + [0, 1, 2, 0] + [0, 0]])
    betas = preference.constrained_betas(t, LossConfig(objective="constrained_sft"))
    np.testing.assert_allclose(betas[0, 2:9], [0.5, 2, 2, 2, 2, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(betas[0, 11:13], [0.5, 2], rtol=1e-6)
    other = LossConfig(objective="constrained_sft", beta=0.2, csft_first_token_factor=3.0,
                       csft_bias_factor=7.0, csft_bias_length=3)
    np.testing.assert_allclose(preference.constrained_betas(t, other)[0, 2:9],
                               [0.6, 1.4, 1.4, 0.2, 0.2, 0.2, 0.2], rtol=1e-6)
    # multi-turn (data.assistant_turns=all): each assistant turn of one sequence restarts at 1
    turns = np.array([[0, 1, 1, 1, 0, 0, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(preference.token_index(turns, np.ones((1, 10), np.int32)),
                                  [[0, 1, 2, 3, 0, 0, 1, 2, 0, 0]])


def np_constrained(lp, ref, batch, cfg):
    """Qi et al. Eq. 3 token by token: per-token loss, t and β_t, each [B, L] (0 off the loss)."""
    B, L = lp.shape
    per_token, index, betas = np.zeros((B, L)), np.zeros((B, L), int), np.zeros((B, L))
    for b in range(B):
        t, seg = 0, None
        for i in range(L):
            if batch["segment_ids"][b, i] != seg:
                t, seg = 0, batch["segment_ids"][b, i]
            if not batch["loss_mask"][b, i]:  # a response (assistant turn) ends
                t = 0
                continue
            t += 1
            if t == 1:
                beta = cfg.beta * cfg.csft_first_token_factor
            elif t <= cfg.csft_bias_length:
                beta = cfg.beta * cfg.csft_bias_factor
            else:
                beta = cfg.beta
            delta = float(lp[b, i]) - float(ref[b, i])
            per_token[b, i] = -(2.0 / beta) * np.log(1.0 / (1.0 + np.exp(-beta * delta)))
            index[b, i], betas[b, i] = t, beta
    return per_token, index, betas


@functools.partial(jax.jit, static_argnames="cfg")
def constrained_sums_and_grad(lp, ref, batch, weights, cfg):
    """constrained_sums and the gradient of its `loss` with respect to the policy's log-probs."""
    def loss(lp):
        sums = preference.constrained_sums(lp, ref, batch, weights, cfg)
        return sums["loss"], sums

    (_, sums), grad = jax.value_and_grad(loss, has_aux=True)(lp)
    return sums, grad


@pytest.mark.parametrize("kw", [{}, dict(beta=0.3, csft_first_token_factor=2.0,
                                         csft_bias_factor=4.0, csft_bias_length=3)])
def test_constrained_sums_match_token_loop(kw, head):
    cfg = LossConfig(objective="constrained_sft", **kw)
    w, w_ref = head
    rng = np.random.default_rng(5)
    rows = [[sequence(rng, 2, 8), sequence(rng, 4, 3), sequence(rng, 1, 6)],
            [sequence(rng, 5, 9), sequence(rng, 3, 7)]]
    batch, hidden = pack(rows, (2, 30))
    # the reference far enough from the policy that β_t matters
    lp, ref = logps_of(hidden, w, batch), logps_of(hidden * 1.5, w_ref, batch)
    weights, _ = jax.jit(loss_lib.loss_weights, static_argnums=1)(batch, cfg, jax.random.PRNGKey(0))
    n_tokens = batch["loss_mask"].sum()
    np.testing.assert_allclose(np.asarray(weights)[batch["loss_mask"]], 1.0 / n_tokens, rtol=1e-6)

    sums, grad = constrained_sums_and_grad(lp, ref, batch, weights, cfg)
    per_token, index, betas = np_constrained(np.asarray(lp), np.asarray(ref), batch, cfg)
    np.testing.assert_array_equal(
        jax.jit(preference.token_index)(batch["loss_mask"], batch["segment_ids"]), index)
    assert index.max() == 9
    np.testing.assert_allclose(sums["loss"], per_token.sum() / n_tokens, rtol=1e-5)
    np.testing.assert_allclose(sums["pref/loss"], per_token.sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["ce/mle"], -np.asarray(lp)[batch["loss_mask"]].sum(), rtol=1e-5)
    assert float(sums["count/mle"]) == n_tokens

    # The docstring's gradient: d loss / d logπ_t = -2 (1 - σ(β_t Δ_t)) × weight_t, what Qi et
    # al.'s code uses (with a floor) as the detached weight of the log-probability.
    delta = np.asarray(lp) - np.asarray(ref)
    expected = -2.0 * (1.0 - 1.0 / (1.0 + np.exp(-betas * delta))) * np.asarray(weights)
    np.testing.assert_allclose(grad, np.where(batch["loss_mask"], expected, 0.0),
                               rtol=1e-5, atol=1e-8)
