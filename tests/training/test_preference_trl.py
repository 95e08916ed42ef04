"""DPO, IPO and SimPO (training/preference.py) against TRL's own code: losses and the gradient of
every parameter, float32, on a tiny random Llama (policy) and a second one (reference).

What each case is compared with (TRL 1.16; the torch side always runs TRL's code for the loss):
- dpo (ε = 0) and ipo: a real `trl.DPOTrainer` (`loss_type="sigmoid"` / `"ipo"`, ref_model given,
  `precompute_ref_log_probs=False`), its `compute_loss` (`_compute_loss`) on a batch made by its own
  collator (`DataCollatorForPreference`: chosen rows, then rejected rows, completion_mask), then
  `backward`. TRL's ipo averages each log-ratio over the response tokens (`completion_mask.sum`).
- dpo with label smoothing ε: DPOTrainer's `"sigmoid"` has no label smoothing in TRL 1.16
  (`label_smoothing` is read only by `"robust"`, `"exo_pair"`, `"aot*"`; checked below), so the
  reference is the conservative-DPO sigmoid of `trl.experimental.cpo.CPOTrainer.cpo_loss`
  (`loss_type="sigmoid"`, alpha 0) applied to the DPO log-ratios: sequence log-probs from
  `CPOTrainer.get_batch_logps` (sums) of policy minus reference.
- simpo (ε = 0 and 0.1): `CPOTrainer.cpo_loss` with `loss_type="simpo"`, alpha 0 (cpo_alpha = 0:
  no NLL term), on `CPOTrainer.get_batch_logps(..., average_log_prob=True)` of the policy's logits,
  as `CPOTrainer.concatenated_forward` does for simpo; `losses.mean()` as `get_batch_loss_metrics`.
`cpo_loss` only reads `alpha`, `loss_type`, `simpo_gamma`, `beta`, `label_smoothing` and
`accelerator.device`, so it runs unbound on a namespace holding them.

Our side: the pairs packed as the batch contract (docs/architecture.md, "Data"; segment 2j + 1
chosen, 2j + 2 rejected), Decoder -> preference.token_logps -> preference.pair_sums with
inv_pairs = 1 / pair_count, and jax.grad through the parameters; gradients are mapped to the
Hugging Face layout by checkpoints/names.py. Two layouts: one pair per row, and two pairs in one
row beside a row with one pair.
"""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from derta_jax.checkpoints.hf import load_hf  # noqa: E402
from derta_jax.checkpoints.names import hf_tensor_specs  # noqa: E402
from derta_jax.data import packing  # noqa: E402
from derta_jax.data.tokenize import TokenizedExample, materialize  # noqa: E402
from derta_jax.models.decoder import Decoder, lm_head_weight  # noqa: E402
from derta_jax.training import preference  # noqa: E402
from derta_jax.training.loss import LossConfig  # noqa: E402

V = 128
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
# (prompt, chosen, rejected) lengths: prompts and responses of different lengths, a chosen
# response shorter than the rejected one and the reverse.
LENGTHS = [(5, 4, 6), (3, 7, 2), (8, 3, 5)]
# Both layouts [3, 36] (one compilation): a pair per row, or two pairs in a row, one in the next
# and an empty row (padding only).
LAYOUTS = {"pair_per_row": [[0], [1], [2]], "two_pairs_in_a_row": [[0, 1], [2], []]}
SHAPE = (3, 36)
CHUNK = 8  # 36 is not a multiple: the chunked LM head pads
RTOL, ATOL = 1e-4, 1e-5


def make_pairs(seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(3, V, n).tolist() for n in lengths) for lengths in LENGTHS]


PAIRS = make_pairs()


def pack(rows: list[list[int]], pairs=PAIRS, shape=SHAPE) -> dict[str, np.ndarray]:
    """The batch contract through the trainer's own packer: each row holds the listed pairs,
    chosen (prompt + chosen) then rejected (prompt + rejected), loss on the responses."""
    examples = [materialize(TokenizedExample(np.asarray(p + c, np.int32), len(p),
                                             rejected=np.asarray(p + r, np.int32)), shape[1])
                for p, c, r in pairs]
    assert len(rows) == shape[0]
    assert max(sum(len(examples[j]["tokens"]) for j in row) for row in rows) < shape[1]
    return packing.fill_rows(examples, rows, shape[0], shape[1])


# --- the models -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The policy (seed 0) and the reference (seed 1) saved as Hugging Face checkpoints."""
    hf_config = transformers.LlamaConfig(**SMALL, rope_parameters=dict(rope_type="default",
                                                                      rope_theta=10000.0))
    out = {}
    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(hf_config)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


def torch_model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                         dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(folders):
    cfg, params = load_hf(folders["policy"], progress=False)
    cfg_ref, ref_params = load_hf(folders["ref"], progress=False)
    assert cfg == cfg_ref and cfg.dtype == "float32"
    return cfg, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, ref_params)


@functools.lru_cache(maxsize=None)
def _model_fns(cfg):
    """Jitted token log-probs of a parameter tree and their VJP (the model part of jax.grad)."""
    def logps(params, batch):
        hidden, _ = Decoder(cfg).apply({"params": params}, batch["tokens"], batch["positions"],
                                       batch["segment_ids"], return_hidden=True)
        return preference.token_logps(hidden, lm_head_weight(params, cfg), batch["targets"], CHUNK)

    def pullback(params, batch, cotangent_BL):
        return jax.vjp(lambda p: logps(p, batch), params)[1](cotangent_BL)[0]

    return jax.jit(logps), jax.jit(pullback)


@functools.lru_cache(maxsize=None)
def _pair_loss(loss_cfg: LossConfig):
    """The loss and metrics given the policy's token log-probs, and the loss's gradient with
    respect to them."""
    def loss(logp_BL, ref_BL, batch):
        inv_pairs = 1.0 / preference.pair_count(batch)
        sums = preference.pair_sums(logp_BL, ref_BL, batch, loss_cfg, inv_pairs)
        return sums["loss"], preference.metrics_from_sums(sums, loss_cfg.objective)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def our_loss_and_grads(ours, layout: str, **loss_kw):
    """Our loss, metrics (preference.metrics_from_sums) and gradient with respect to every
    parameter. The gradient is jax.grad of params -> token_logps(Decoder(params)) -> pair_sums,
    taken in two jitted pieces (reverse mode
    does exactly this: ∂loss/∂logp, then the model's VJP), so that one compilation of the model
    serves every objective and layout (a compilation costs seconds on CPU)."""
    cfg, params, ref_params = ours
    batch = {k: jnp.asarray(v) for k, v in pack(LAYOUTS[layout]).items()}
    loss_cfg = LossConfig(**loss_kw)
    logps, pullback = _model_fns(cfg)
    ref = None if loss_cfg.objective == "simpo" else logps(ref_params, batch)
    (loss, metrics), d_logp = _pair_loss(loss_cfg)(logps(params, batch), ref, batch)
    assert float(metrics["pairs"]) == len(PAIRS)
    return float(loss), pullback(params, batch, d_logp), {k: float(v) for k, v in metrics.items()}


# --- TRL's side -------------------------------------------------------------------------------

def trl_batch():
    """TRL's own collator: input_ids = chosen rows then rejected rows, right-padded."""
    collator = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0)
    return collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])


def tiny_tokenizer():
    """A word-level tokenizer over V ids (the trainer requires one; our pairs are token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0",
                                                eos_token="t1", unk_token="t2")


@pytest.fixture(scope="module")
def dpo_trainers(folders, tmp_path_factory):
    """A real DPOTrainer per loss type, each with fresh copies of the policy and the reference."""
    import datasets
    dataset = datasets.Dataset.from_list([{"prompt": "t3 t4 ", "chosen": "t5 ", "rejected": "t6 "}])
    cache = {}

    def get(loss_type: str, beta: float):
        if (loss_type, beta) not in cache:
            args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), report_to="none",
                                 beta=beta, loss_type=[loss_type], precompute_ref_log_probs=False,
                                 bf16=False, fp16=False, gradient_checkpointing=False,
                                 use_cpu=True, disable_dropout=True)
            cache[loss_type, beta] = trl.DPOTrainer(
                model=torch_model(folders["policy"]), ref_model=torch_model(folders["ref"]),
                args=args, train_dataset=dataset, processing_class=tiny_tokenizer())
        return cache[loss_type, beta]

    return get


def trl_dpo_loss_and_grads(trainer):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, trl_batch())
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in model.named_parameters()}


def cpo_losses(loss_type: str, beta: float, label_smoothing: float, chosen, rejected,
               simpo_gamma: float = 0.0):
    """TRL's CPOTrainer.cpo_loss, unbound, on the attributes it reads: (losses, chosen rewards,
    rejected rewards) per pair."""
    from trl.experimental.cpo import CPOTrainer
    trainer = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=simpo_gamma,
                                    beta=beta, label_smoothing=label_smoothing,
                                    accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


def cpo_loss(*args, **kw):
    """The mean as CPOTrainer.get_batch_loss_metrics (cpo_alpha = 0: no NLL term)."""
    return cpo_losses(*args, **kw)[0].mean()


def cpo_sequence_logps(model, batch, average: bool):
    """CPOTrainer.get_batch_logps on the model's logits: labels -100 outside the responses."""
    from trl.experimental.cpo import CPOTrainer
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average).chunk(2)


# --- comparisons ------------------------------------------------------------------------------

def assert_grads_match(cfg, ours_tree, torch_grads: dict[str, np.ndarray]):
    """Every parameter: the Hugging Face gradient in our layout (names.py) equals ours."""
    specs = hf_tensor_specs(cfg)
    assert set(specs) == set(torch_grads)
    for name, spec in specs.items():
        (path, to_ours), = spec.outputs
        leaf = ours_tree
        for key in path:
            leaf = leaf[key]
        expected = to_ours(torch_grads[name])
        assert np.abs(expected).max() > 0, name  # every tensor gets a gradient here
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl_dpo_trainer(ours, dpo_trainers, loss_type, layout):
    trainer = dpo_trainers(loss_type, 0.1)
    trl_loss, trl_grads = trl_dpo_loss_and_grads(trainer)
    objective = {"sigmoid": "dpo", "ipo": "ipo"}[loss_type]
    loss, grads, metrics = our_loss_and_grads(ours, layout, objective=objective, beta=0.1)
    np.testing.assert_allclose(loss, trl_loss, rtol=RTOL, atol=ATOL)
    assert_grads_match(ours[0], grads, trl_grads)
    # the logged means over pairs: rewards β ρ (not length-averaged, for ipo too), sequence logps
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    for ours_key, trl_key in (("reward/chosen", "rewards/chosen"),
                              ("reward/rejected", "rewards/rejected"),
                              ("reward/accuracy", "rewards/accuracies"),
                              ("reward/margin", "rewards/margins"),
                              ("logps/chosen", "logps/chosen"),
                              ("logps/rejected", "logps/rejected")):
        np.testing.assert_allclose(metrics[ours_key], logged[trl_key][-1], rtol=RTOL, atol=ATOL,
                                   err_msg=ours_key)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_label_smoothing_matches_trl_conservative_sigmoid(ours, folders, dpo_trainers, layout):
    eps, beta = 0.2, 0.1
    # DPOTrainer's "sigmoid" ignores label_smoothing (TRL 1.16): hence CPO's form as the reference.
    trainer = dpo_trainers("sigmoid", beta)
    plain, _ = trl_dpo_loss_and_grads(trainer)
    trainer.label_smoothing = eps
    try:
        assert trl_dpo_loss_and_grads(trainer)[0] == plain
    finally:
        trainer.label_smoothing = 0.0

    policy, ref = torch_model(folders["policy"]), torch_model(folders["ref"])
    batch = trl_batch()
    chosen, rejected = cpo_sequence_logps(policy, batch, average=False)
    with torch.no_grad():
        ref_chosen, ref_rejected = cpo_sequence_logps(ref, batch, average=False)
    trl_loss = cpo_loss("sigmoid", beta, eps, chosen - ref_chosen, rejected - ref_rejected)
    trl_loss.backward()
    trl_grads = {n: p.grad.numpy() for n, p in policy.named_parameters()}

    loss, grads, _ = our_loss_and_grads(ours, layout, objective="dpo", beta=beta,
                                        label_smoothing=eps)
    assert abs(loss - plain) > 1e-3  # the smoothing matters here
    np.testing.assert_allclose(loss, float(trl_loss.detach()), rtol=RTOL, atol=ATOL)
    assert_grads_match(ours[0], grads, trl_grads)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_loss(ours, folders, eps, layout):
    beta, gamma = 2.0, 0.5
    policy = torch_model(folders["policy"])
    chosen, rejected = cpo_sequence_logps(policy, trl_batch(), average=True)
    trl_loss = cpo_loss("simpo", beta, eps, chosen, rejected, simpo_gamma=gamma)
    trl_loss.backward()
    trl_grads = {n: p.grad.numpy() for n, p in policy.named_parameters()}

    loss, grads, metrics = our_loss_and_grads(ours, layout, objective="simpo", beta=beta,
                                              label_smoothing=eps, simpo_gamma=gamma)
    np.testing.assert_allclose(loss, float(trl_loss.detach()), rtol=RTOL, atol=ATOL)
    # cpo_loss's rewards: β × the length-averaged log-probs
    _, trl_chosen_rewards, trl_rejected_rewards = cpo_losses("simpo", beta, eps, chosen, rejected,
                                                             simpo_gamma=gamma)
    np.testing.assert_allclose(metrics["reward/chosen"], float(trl_chosen_rewards.mean()),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["reward/rejected"], float(trl_rejected_rewards.mean()),
                               rtol=RTOL, atol=ATOL)
    assert_grads_match(ours[0], grads, trl_grads)
