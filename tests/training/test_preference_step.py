"""The preference objectives on the sharded step and in the loop: meshes, micro-batches, LoRA's
reference, the stored reference, and exact resume for each objective."""
import jax
import numpy as np
import pytest

from derta_jax.data import loader as loader_lib
from derta_jax.data.tokenize import TokenizedExample
from derta_jax.models.decoder import Decoder, lm_head_weight
from derta_jax.training import loop, preference as pref, reference
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib
from derta_jax.training.loss import LossConfig
from tests.training.helpers import tiny_model
from tests.training.run_helpers import read_metrics, tiny_config
from tests.training.test_loop import final_params
from tests.training.test_step import OPT, assert_trees_close, grads_on

ROWS, LENGTH = 8, 32
OBJECTIVES = ("dpo", "ipo", "simpo", "constrained_sft")


def pair_examples(n: int, seed: int, vocab: int = 64) -> list[TokenizedExample]:
    """Pairs of random ids: a shared prompt of 2-5 tokens, responses of 2-7 tokens each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = list(rng.integers(3, vocab, rng.integers(2, 6)))
        chosen, rejected = (prompt + list(rng.integers(3, vocab, rng.integers(2, 8)))
                            for _ in range(2))
        out.append(TokenizedExample(np.asarray(chosen, np.int32), len(prompt),
                                    rejected=np.asarray(rejected, np.int32)))
    return out


def pair_batch(seed: int, examples: list[TokenizedExample] | None = None):
    examples = examples or pair_examples(12, seed)
    plan = loader_lib.make_plan(examples, len(examples), LENGTH, seed, steps=1, row_multiple=ROWS)
    return loader_lib.step_batch(examples, plan, seed, 0)


def setup_for(objective: str, mesh, lora_rank: int = 0, accum: int = 1):
    model = tiny_model(lora_rank=lora_rank, lora_alpha=8.0)
    cfg = step_lib.StepConfig(model, LossConfig(objective=objective, chunk_size=8), OPT, accum)
    return cfg, step_lib.build(cfg, mesh, total_steps=10)


def with_reference(batch, seed: int = 3):
    """A stand-in stored reference: the policy's log-probs plus noise (so log-ratios are not 0)."""
    rng = np.random.default_rng(seed)
    return {**batch, "ref_logps": rng.normal(-4.0, 1.0, batch["tokens"].shape).astype(np.float32)}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_eight_devices_equal_one_device(objective):
    one = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    cfg, setup = setup_for(objective, one)
    state = jax.device_get(setup.init(jax.random.PRNGKey(0)))
    batch = with_reference(pair_batch(0))
    g1, s1 = grads_on(one, cfg, state, batch, jax.random.PRNGKey(7))
    assert s1["count/pairs"] > 0 or objective == "constrained_sft"
    eight = shd.make_mesh(shd.MeshConfig(2, 2, 2))
    cfg8, setup8 = setup_for(objective, eight)
    g8, s8 = grads_on(eight, cfg8, jax.device_put(state, setup8.shardings), batch,
                      jax.random.PRNGKey(7))
    assert_trees_close(s1, s8)
    assert_trees_close(g1, g8)
    if objective == "dpo":  # pairs never straddle micro-batches: 4 of them pool to the same
        cfg4, _ = setup_for(objective, one, accum=4)
        g4, s4 = grads_on(one, cfg4, state, batch, jax.random.PRNGKey(7))
        assert_trees_close(s1, s4)
        assert_trees_close(g1, g4)


def test_lora_at_zero_is_its_reference():
    """lora_b starts at 0: the policy is the frozen base. Their log-probs are bit-identical as
    plain forwards; inside the gradient XLA fuses the policy's forward differently, so the step's
    log-ratios are 0 up to float32 rounding (|ratio| < 1e-5) and DPO's loss is log 2 to 1 ulp."""
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    cfg, setup = setup_for("dpo", mesh, lora_rank=4)
    state = setup.init(jax.random.PRNGKey(0))
    batch = {k: jax.numpy.asarray(v) for k, v in pair_batch(1).items()}
    mc = cfg.model

    @jax.jit
    def policy(params, lora):
        hidden, _ = Decoder(mc).apply({"params": params, "lora": lora}, batch["tokens"],
                                      batch["positions"], batch["segment_ids"], return_hidden=True)
        return pref.token_logps(hidden, lm_head_weight(params, mc), batch["targets"], 8)

    base = jax.jit(lambda p, l: step_lib._base_logps(p, l, batch, mc, 8))
    np.testing.assert_array_equal(policy(state["params"], state["lora"]),
                                  base(state["params"], state["lora"]))
    _, metrics = setup.train_step(state, shd.shard_batch(pair_batch(1), mesh),
                                  jax.random.PRNGKey(2))
    np.testing.assert_allclose(float(metrics["loss/dpo"]), np.log(2.0), rtol=2e-7)
    assert abs(float(metrics["reward/chosen"])) < 1e-6 and float(metrics["pairs"]) > 0


def test_stored_reference_equals_the_live_log_probs():
    """reference.compute packs the examples its own way; each position's stored log-prob equals
    a forward over the training batch, and a full-parameter DPO step on it starts at log 2."""
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    cfg, setup = setup_for("dpo", mesh)
    state = setup.init(jax.random.PRNGKey(0))
    examples = pair_examples(12, seed=4)
    stored = reference.compute(examples, state["params"], cfg.model, mesh, LENGTH, ROWS, 8)
    assert [len(s) for s in stored] == [ex.length() for ex in examples]
    batch = pair_batch(4, reference.attach(examples, stored))
    hidden, _ = Decoder(cfg.model).apply({"params": jax.device_get(state["params"])},
                                         batch["tokens"], batch["positions"],
                                         batch["segment_ids"], return_hidden=True)
    live = pref.token_logps(hidden, lm_head_weight(jax.device_get(state["params"]), cfg.model),
                            batch["targets"], 8)
    mask = batch["segment_ids"] > 0
    np.testing.assert_allclose(batch["ref_logps"][mask], np.asarray(live)[mask], rtol=1e-5,
                               atol=1e-5)
    _, metrics = setup.train_step(state, shd.shard_batch(batch, mesh), jax.random.PRNGKey(2))
    np.testing.assert_allclose(float(metrics["loss/dpo"]), np.log(2.0), rtol=1e-5)


PAIRS = dict(data__recipe="preference", data__rto_count=-1, data__prefix_count=-1,
             data__helpful_count=-1, data__pairs_count=16, data__max_length=128)
CASES = {  # objective -> config overrides
    "dpo": dict(PAIRS),  # full parameter: the stored reference
    "ipo": dict(PAIRS, model__lora_rank=4),  # LoRA: the base as reference
    "simpo": dict(PAIRS),  # no reference
    "constrained_sft": dict(data__recipe="recaug", data__rto_count=-1, data__prefix_count=16,
                            model__lora_rank=4),  # LoRA: the base as reference
}


# Resume is the loop's (objective-blind) except for the reference: the stored one of a
# full-parameter run, LoRA's live one, or none.
@pytest.mark.parametrize("objective", tuple(CASES))
def test_resume_equals_an_uninterrupted_run(tmp_path, objective, llama3_tokenizer_dir):
    config = tiny_config(steps=3, loss__objective=objective, **CASES[objective])
    loop.train(config, tmp_path / "straight")
    config.train.stop_at = 1
    loop.train(config, tmp_path / "resumed")
    config.train.stop_at = -1
    loop.train(config, tmp_path / "resumed")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
               {k: v for k, v in b.items() if not k.startswith("perf/")}
    assert f"loss/{objective}" in straight[0]
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "straight", 3),
                 final_params(tmp_path / "resumed", 3))
    stored = (tmp_path / "straight" / reference.FILE).exists()
    assert stored == (objective in pref.NEEDS_REFERENCE and "model__lora_rank" not in CASES[objective])


def test_stored_reference_is_checked_against_the_examples(tmp_path):
    """The stored file is reused only for the same examples; a resume without it is refused."""
    examples = pair_examples(3, seed=5)
    logps = [np.full(ex.length(), -float(i), np.float32) for i, ex in enumerate(examples)]
    calls = []
    first = reference.load_or_compute(tmp_path, examples, lambda: calls.append(1) or logps,
                                      has_progress=False)
    again = reference.load_or_compute(tmp_path, examples, lambda: calls.append(1) or logps,
                                      has_progress=True)
    assert calls == [1]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="other training examples"):
        reference.load_or_compute(tmp_path, pair_examples(3, seed=6), lambda: logps, True)
    with pytest.raises(ValueError, match="is missing but the run has checkpoints"):
        reference.load_or_compute(tmp_path / "new", examples, lambda: logps, has_progress=True)
