"""Our DeRTa loss, gradients and AdamW step against the official recipe reimplemented in PyTorch
(official_recipe_torch.py).

The same tiny random LlamaForCausalLM (saved by transformers, read with our load_hf), the same
official-format demo records (helpful, RTO and harmful-prefix), the LLaMA-3 tokenizer and RTO keep
ratio 1.0: our tokenisation, padded and packed batches, loss, gradients and one optimizer step
must equal transformers' shifted-label loss with the official label rewriting.
"""
import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from derta_jax.checkpoints.hf import load_hf
from derta_jax.checkpoints.names import canonical_shapes, hf_tensor_specs, lazy_tree, read_tree
from derta_jax.data import packing, pipeline
from derta_jax.data.recipe import DertaRecord
from derta_jax.data.refusal import refusal_token_id
from derta_jax.data.tokenize import build_examples, materialize
from derta_jax.models.decoder import Decoder, lm_head_weight
from derta_jax.training import sharding as shd, step as step_lib
from derta_jax.training.loss import derta_loss
from tests.reference import official_recipe_torch as official

MAX_LEN = 64
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.5, 1.0  # decay large enough to see a wrong decay mask


@pytest.fixture(scope="module")
def setup(llama3_tokenizer_dir, tmp_path_factory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    torch.manual_seed(0)
    # A large init spread gives peaked logits, so that one misplaced target moves the loss.
    hf_cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500000.0, initializer_range=0.5, bos_token_id=128000, eos_token_id=128001)
    model = transformers.LlamaForCausalLM(hf_cfg)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    cfg, params = load_hf(folder, progress=False)
    records = [r.to_json() for r in pipeline.mixture_records(
        "derta", pipeline.DEMO_SAFETY, pipeline.DEMO_HELPFUL, tokenizer, helpful_count=3,
        rto_count=3, prefix_count=3)]
    refusal = refusal_token_id(tokenizer)
    ours, stats = build_examples([DertaRecord(r["prefix"], r["text"], r["safe"] == "true")
                                  for r in records], tokenizer, MAX_LEN, refusal, "base")
    assert stats.examples == len(records) and stats.truncated > 0  # truncation is exercised
    theirs = official.tokenize(records, tokenizer, MAX_LEN, bos_id=tokenizer.bos_token_id)
    return dict(model=model, cfg=cfg, params=params, records=records, refusal=refusal,
                ours=[materialize(e, MAX_LEN) for e in ours], theirs=theirs)


def our_loss(cfg, params, batch) -> float:
    """Our DeRTa loss (RTO keep 1.0, token normalisation) of one batch of the data contract."""
    @jax.jit
    def loss_fn(params, batch):
        hidden, _ = Decoder(cfg).apply({"params": params}, batch["tokens"], batch["positions"],
                                       batch["segment_ids"], return_hidden=True)
        return derta_loss(hidden, lm_head_weight(params, cfg), batch,
                          step_lib.LossConfig(rto_keep=1.0), jax.random.PRNGKey(0))[0]

    return float(loss_fn(params, batch))


def reference_loss(s) -> float:
    with torch.no_grad():
        return float(official.pooled_loss(s["model"], official.collate(s["theirs"], 0), s["refusal"]))


def padded_batch(s):
    return packing.pad_batch(s["ours"], (max(len(a["tokens"]) for a in s["ours"]),))


def packed_batch(s):
    """Every example packed into 2 rows of 256 (first-fit decreasing), all in one batch."""
    bins = packing.first_fit_decreasing([len(a["tokens"]) for a in s["ours"]], 256)
    batch = packing.fill_rows(s["ours"], bins, rows=2, length=256)
    assert (batch["segment_ids"].max(axis=1) > 1).all()  # really packed
    assert batch["loss_mask"].sum() == sum(a["loss_mask"].sum() for a in s["ours"])
    return batch


def test_tokenisation_matches_the_official_rule(setup):
    assert {r["safe"] for r in setup["records"]} == {"true", "false"}
    for a, o in zip(setup["ours"], setup["theirs"]):
        assert a["tokens"].tolist() == o.input_ids
        supervised = np.asarray(o.labels[1:]) != official.IGNORE_INDEX  # label t+1 <-> logits t
        np.testing.assert_array_equal(a["loss_mask"][:-1], supervised)
        np.testing.assert_array_equal(a["rto_mask"][:-1], supervised & o.safe)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_equals_the_official_pooled_loss(setup, layout):
    batch = padded_batch(setup) if layout == "padded" else packed_batch(setup)
    ours = our_loss(setup["cfg"], setup["params"], batch)
    assert ours == pytest.approx(reference_loss(setup), rel=1e-5)


def test_rto_targets_shifted_by_one_are_caught(setup):
    batch = padded_batch(setup)
    rto_rows = batch["rto_mask"].any(axis=1)
    for key in ("loss_mask", "rto_mask"):  # the bug: RTO supervision one position late
        batch[key][rto_rows] = np.roll(batch[key][rto_rows], 1, axis=1)
    batch["targets"][batch["rto_mask"]] = setup["refusal"]
    ours = our_loss(setup["cfg"], setup["params"], batch)
    assert abs(ours - reference_loss(setup)) > 100 * 1e-5 * reference_loss(setup)


def to_canonical(named: dict[str, np.ndarray], cfg) -> dict:
    return read_tree(lazy_tree(hf_tensor_specs(cfg), canonical_shapes(cfg), "float32",
                              named.__getitem__))


def test_gradients_and_one_adamw_step_equal_the_official_step(setup):
    cfg, model = setup["cfg"], setup["model"]
    batch = packed_batch(setup)
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    step_cfg = step_lib.StepConfig(
        cfg, step_lib.LossConfig(rto_keep=1.0, chunk_size=32), step_lib.OptimizerConfig(
            learning_rate=LR, schedule="constant", warmup_ratio=0.0, weight_decay=WEIGHT_DECAY,
            grad_clip=CLIP))
    step_setup = step_lib.build(step_cfg, mesh, total_steps=10)
    state = step_setup.init(jax.random.PRNGKey(0), setup["params"])
    with mesh:
        grads, _ = jax.jit(functools.partial(step_lib.compute_grads, cfg=step_cfg))(
            state, shd.shard_batch(batch, mesh), jax.random.PRNGKey(1))
    state, metrics = step_setup.train_step(state, shd.shard_batch(batch, mesh), jax.random.PRNGKey(1))

    torch_model = transformers.LlamaForCausalLM(model.config)
    torch_model.load_state_dict(model.state_dict())
    opt = official.official_optimizer(torch_model, LR, WEIGHT_DECAY)
    collated = official.collate(setup["theirs"], 0)
    official.pooled_loss(torch_model, collated, setup["refusal"]).backward()
    torch_grads = to_canonical({n: p.grad.numpy() for n, p in torch_model.named_parameters()}, cfg)
    loss = official.train_step(torch_model, opt, collated, setup["refusal"], CLIP)

    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
    # float32 sums in a different order: tight against each tensor's scale (observed <= 2.3e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * abs(b).max()),
                 jax.device_get(grads), torch_grads)
    updated = to_canonical({n: p.detach().numpy() for n, p in torch_model.named_parameters()}, cfg)
    # Adam's first update is lr * g / (|g| + eps), g clipped: ~lr * sign(g), equal to 1% of lr
    # (observed <= 0.3%) plus what the float32 gradient differences above imply where |g| is
    # near eps (there the update is ill-conditioned: a 1e-8 gradient difference can move it by
    # a few % of lr). Decay moves both sides by lr * wd * |p|.
    eps = step_lib.OptimizerConfig().eps
    norm = lambda tree: np.sqrt(sum(float((g ** 2).sum()) for g in jax.tree.leaves(tree)))  # noqa: E731
    clip_ours, clip_theirs = (min(1.0, CLIP / norm(t)) for t in (jax.device_get(grads), torch_grads))

    def check(ours, theirs, g_ours, g_theirs):
        first = lambda g, c: g * c / (np.abs(g * c) + eps)  # noqa: E731
        explained = LR * np.abs(first(g_ours, clip_ours) - first(g_theirs, clip_theirs))
        assert np.all(np.abs(ours - theirs) <= 1e-2 * LR + explained)

    jax.tree.map(check, jax.device_get(state["params"]), updated, jax.device_get(grads),
                 torch_grads)
