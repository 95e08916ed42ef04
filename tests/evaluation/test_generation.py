"""Batched KV-cache generation vs a literal loop of full forwards, stop ids, sampling, buckets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.evaluation import generation
from derta_jax.evaluation.generation import Generation, generate
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import Decoder, init_variables
from derta_jax.models.layout import stack_layers
from derta_jax.training import sharding as shd

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,))
PROMPTS = [[5, 9, 11], [7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def params():
    return init_variables(CFG, jax.random.key(0))["params"]


def _greedy_reference(params, prompt, n, width=16):
    """Greedy decoding the slow, obvious way: a full forward over the whole sequence per token
    (right-padded to one width with segment 0, so it compiles once)."""
    apply = jax.jit(Decoder(CFG).apply)
    ids = list(prompt)
    for _ in range(n):
        t = np.zeros((1, width), np.int32)
        t[0, :len(ids)] = ids
        seg = (np.arange(width) < len(ids))[None].astype(np.int32)
        logits, _ = apply({"params": params}, t, np.arange(width)[None], seg)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def references(params):
    return [_greedy_reference(params, p, 6) for p in PROMPTS]


def test_batched_greedy_equals_full_forward_loop(params, references):
    # batch_size 3 over 4 prompts: two batches, the second padded with inactive rows.
    out = generate(params, CFG, PROMPTS, max_new_tokens=6, stop_ids=[], batch_size=3, progress=False)
    assert out == [Generation(r, "length") for r in references]


def test_a_cache_read_in_blocks_gives_the_same_tokens(params, references):
    """attention_block 4 over the 16- and 32-slot caches of these prompts: decode reads only the
    filled blocks (models/attention.py cached_attend), and greedy tokens stay those of the loop."""
    out = generate(params, CFG.replace(attention_block=4), PROMPTS, max_new_tokens=6, stop_ids=[],
                   batch_size=3, progress=False)
    assert out == [Generation(r, "length") for r in references]


def test_stop_ids_end_rows_and_are_excluded(params, references):
    # Stop on the 3rd token of prompt 0 and on the 2nd of prompt 2; others run to length unless
    # they happen to produce one of those ids, which the reference tells us.
    stops = [references[0][2], references[2][1]]
    out = generate(params, CFG, PROMPTS, max_new_tokens=6, stop_ids=stops, progress=False)
    for got, ref in zip(out, references):
        cut = next((i for i, t in enumerate(ref) if t in stops), None)
        want = Generation(ref, "length") if cut is None else Generation(ref[:cut], "stop")
        assert got == want
    assert out[0].finish_reason == out[2].finish_reason == "stop"


MORE_PROMPTS = [[30, 31], [8, 8, 8, 8], [40, 2, 41], [50, 51, 52, 53, 54, 55, 56]]


@pytest.mark.parametrize("scan_layers, mesh_cfg", [(False, shd.MeshConfig(data=2)),
                                                   (True, shd.MeshConfig(data=1, tensor=2))],
                         ids=["layers, batch on 2 devices", "scan_layers, heads on 2 devices"])
def test_rows_that_stop_leave_the_batch_and_the_rest_decode_on(params, references, monkeypatch,
                                                                scan_layers, mesh_cfg):
    """8 rows stopping at different steps: once half of them have stopped the other half goes on
    as a batch of 4 (then 2, and 1 where the batch is not split over devices; COMPACT_MIN_ROWS
    lowered to 1 here); every row still gets the literal loop's tokens up to its first stop id."""
    refs = references + [_greedy_reference(params, p, 6) for p in MORE_PROMPTS]
    stops = [refs[0][1], refs[2][3], refs[4][2], refs[7][4]]
    batches = []
    decode = generation._decode

    def spy(variables, state, s):
        batches.append(state["token"].shape[0])
        return decode(variables, state, s)

    monkeypatch.setattr(generation, "_decode", spy)
    monkeypatch.setattr(generation, "COMPACT_MIN_ROWS", 1)
    cfg, model_params = CFG, params
    if scan_layers:
        cfg, model_params = CFG.replace(scan_layers=True), stack_layers(params)
    mesh = shd.make_mesh(mesh_cfg, jax.devices()[:2])
    out = generate(model_params, cfg, PROMPTS + MORE_PROMPTS, max_new_tokens=6, stop_ids=stops,
                   batch_size=8, progress=False, mesh=mesh)
    for got, ref in zip(out, refs):
        cut = next((i for i, t in enumerate(ref) if t in stops), None)
        assert got == (Generation(ref, "length") if cut is None else Generation(ref[:cut], "stop"))
    assert batches[:2] == [8, 4], batches  # it did continue on half the batch


def test_tiny_top_p_is_greedy_and_the_seed_decides_samples(params, references):
    # A nucleus this small keeps only the top token: sampling equals greedy.
    tiny_p = generate(params, CFG, PROMPTS, max_new_tokens=6, stop_ids=[], temperature=1.0,
                      top_p=1e-6, progress=False)
    assert [g.token_ids for g in tiny_p] == references
    a = generate(params, CFG, PROMPTS, max_new_tokens=6, stop_ids=[], temperature=2.0, seed=1, progress=False)
    b = generate(params, CFG, PROMPTS, max_new_tokens=6, stop_ids=[], temperature=2.0, seed=1, progress=False)
    c = generate(params, CFG, PROMPTS, max_new_tokens=6, stop_ids=[], temperature=2.0, seed=2, progress=False)
    assert a == b and a != c
    assert all(0 <= t < CFG.vocab_size for g in a for t in g.token_ids)


def test_sample_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.vmap(lambda k: generation.sample(logits, k, 1.0, 0.7))(keys))[:, 0]
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 so token 1 completes the nucleus
    assert abs(np.mean(draws == 0) - 0.5 / 0.8) < 0.08


def test_prompt_lengths_within_a_bucket_share_one_compilation(params):
    compiles = []

    def count(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    generate(params, CFG, [[1, 2, 3]], max_new_tokens=4, stop_ids=[2], progress=False)  # warm up
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for prompt in ([4] * 9, [5] * 16):  # the same 16-token bucket: nothing compiled
            generate(params, CFG, [prompt], max_new_tokens=4, stop_ids=[2], progress=False)
        assert compiles == []
        generate(params, CFG, [[6] * 17], max_new_tokens=4, stop_ids=[2], progress=False)
        assert len(compiles) >= 2  # a new bucket: prefill and decode compiled again
    finally:
        jax.monitoring.unregister_event_duration_listener(count)


def test_left_pad_right_aligns_rows_and_buckets_are_powers_of_two():
    tokens, positions, segments = generation.left_pad([[7, 8], [9]], 4, 3)
    np.testing.assert_array_equal(tokens, [[0, 0, 7, 8], [0, 0, 0, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(segments, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert [generation.bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


@pytest.mark.parametrize("kwargs, match", [(dict(max_new_tokens=0), "max_new_tokens=0"),
                                           (dict(top_p=0.0), "top_p=0.0"),
                                           (dict(temperature=-1.0), "temperature=-1.0")])
def test_bad_arguments_are_named(params, kwargs, match):
    args = dict(max_new_tokens=4, stop_ids=[2], progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(params, CFG, [[1, 2]], **args)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(params, CFG, [[1], []], max_new_tokens=2, stop_ids=[], progress=False)
