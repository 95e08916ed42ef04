"""Every config variant validates, carries the paper's hyperparameters, and is overridable."""
import pytest
from absl import flags
from ml_collections import config_flags

from tests.training.run_helpers import ROOT


def parse(*argv: str):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=["train", *argv])
    values(["train", *argv])
    return values.config


@pytest.mark.parametrize("spec,lr,keep,rank,length,recipe", [
    ("llama3.py:8b", 2e-5, 0.05, 0, 1024, "derta"),
    ("llama3.py:70b_lora", 1e-4, 1.0, 96, 512, "derta"),
    ("llama3.py:70b_instruct_lora,rto_only", 1e-4, 1.0, 96, 512, "rto_only"),
    ("mistral.py:7b,vanilla", 2e-5, 0.05, 0, 1024, "vanilla"),
    ("mixtral.py:8x7b,recaug", 1e-4, 1.0, 96, 512, "recaug"),
])
def test_paper_hyperparameters(spec, lr, keep, rank, length, recipe):
    from derta_jax.training.config import validate
    c = parse(f"--config={ROOT / 'configs' / spec}")
    validate(c)
    assert (c.optimizer.learning_rate, c.loss.rto_keep, c.model.lora_rank, c.data.max_length,
            c.data.recipe) == (lr, keep, rank, length, recipe)
    assert c.train.batch_size == 128 and c.train.epochs == 2.0
    assert (c.data.eos_text, c.data.template, c.model.dtype) == ("<|end_of_text|>", "base", "bfloat16")
    if rank:
        assert (c.model.lora_alpha, c.model.lora_dropout, c.optimizer.warmup_ratio,
                c.optimizer.weight_decay, c.optimizer.schedule) == (16.0, 0.05, 0.0, 0.0, "linear")
    else:
        assert (c.optimizer.schedule, c.optimizer.warmup_ratio, c.optimizer.weight_decay,
                c.optimizer.decay_norms, c.loss.rto_keep_rule) == \
            ("cosine", 0.03, 2e-5, True, "official")


def test_every_key_is_overridable_on_the_locked_config():
    c = parse(f"--config={ROOT / 'configs' / 'smollm2.py'}", "--config.train.steps=100",
              "--config.loss.rto_keep=0.5", "--config.mesh.fsdp=2")
    assert (c.train.steps, c.loss.rto_keep, c.mesh.fsdp) == (100, 0.5, 2)
    with pytest.raises(Exception, match="stepz"):
        parse(f"--config={ROOT / 'configs' / 'smollm2.py'}", "--config.train.stepz=1")


def test_unknown_variant_is_named():
    import llama3  # configs/ is on sys.path through run_helpers
    with pytest.raises(ValueError, match="variant '13b'"):
        llama3.get_config("13b")


@pytest.mark.parametrize("spec,length", [("llama3.py:8b", 1024), ("llama3.py:70b_lora", 512)])
@pytest.mark.parametrize("packed", [True, False])
def test_paper_configs_take_128_examples_per_step_as_the_official_trainer(spec, length, packed):
    """1,000 examples at 128 per step: ceil(1000 / 128) = 8 steps per epoch, 16 in 2 epochs; the
    8th step of each epoch takes the other 1000 - 7 * 128 = 104 examples."""
    import jax
    import numpy as np
    from derta_jax.data import loader
    from derta_jax.data.tokenize import TokenizedExample
    from derta_jax.training import config as config_lib, loop, sharding as shd
    c = parse(f"--config={ROOT / 'configs' / spec}", f"--config.data.packing={packed}")
    run = config_lib.parse(c)
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(np.arange(1, int(n) + 1, dtype=np.int32) + 1000 * i, prompt_len=5)
                for i, n in enumerate(rng.integers(20, length, 1000))]
    mesh = shd.make_mesh(run.mesh)
    plan = loop.make_plan(run, examples, mesh)
    assert (plan.batch_size, plan.steps_per_epoch, plan.total_steps) == (128, 8, 16)
    assert plan.rows_per_step % len(jax.devices()) == 0 and plan.seq_len == length
    assert plan.rows_per_step == 128 if not packed else plan.rows_per_step < 128
    seen = [0] * 16
    for step in range(16):
        idx, epoch = loader.step_examples(1000, 128, run.data.seed, step)
        seen[step] = len(idx)
        assert epoch == step // 8
    assert seen == ([128] * 7 + [104]) * 2


def _changed(spec: str) -> dict:
    """The keys (section.key) where configs/smollm2.py:<variant> differs from the default demo."""
    base = parse(f"--config={ROOT / 'configs' / 'smollm2.py'}").to_dict()
    c = parse(f"--config={ROOT / 'configs' / spec}").to_dict()
    return {f"{s}.{k}": v for s in c for k, v in c[s].items() if base[s][k] != v}


@pytest.mark.parametrize("variant,changed", [
    ("derta", {}),  # the default, by name
    ("vanilla", {"data.recipe": "vanilla", "data.vanilla_count": 100, "data.rto_count": -1,
                 "data.prefix_count": -1}),
    ("recaug", {"data.recipe": "recaug", "data.prefix_count": 100, "data.rto_count": -1}),
    ("rto_only", {"data.recipe": "rto_only", "data.vanilla_count": 50, "data.prefix_count": -1}),
    # the paper's DPO baseline on the vanilla demo workdir: the 100 safety triples as pairs,
    # 256 tokens per sequence, one epoch, our learning rate, no warmup
    ("dpo", {"model.checkpoint": "runs/smollm2-vanilla", "data.recipe": "preference",
             "data.pairs_count": 100, "data.rto_count": -1, "data.prefix_count": -1,
             "data.max_length": 512, "loss.objective": "dpo", "optimizer.learning_rate": 5e-6,
             "optimizer.warmup_ratio": 0.0, "train.epochs": 1.0}),
    # Qi et al. on the recaug data, from the untouched model, the demo's steps and rate
    ("constrained", {"data.recipe": "recaug", "data.prefix_count": 100, "data.rto_count": -1,
                     "loss.objective": "constrained_sft"}),
])
def test_smollm2_variants_validate_and_change_only_their_keys(variant, changed):
    from derta_jax.training.config import validate
    c = parse(f"--config={ROOT / 'configs' / f'smollm2.py:{variant}'}")
    validate(c)
    assert _changed(f"smollm2.py:{variant}") == changed
    # what every variant keeps from the demo (the DPO row's β is LossConfig's default, TRL's 0.1)
    assert (c.model.dtype, c.data.template, c.train.batch_size, c.loss.beta) == \
        ("float32", "chat", 24, 0.1)


def test_smollm2_default_is_the_derta_demo():
    c = parse(f"--config={ROOT / 'configs' / 'smollm2.py'}")
    assert (c.model.checkpoint, c.data.recipe, c.loss.objective, c.data.rto_count,
            c.data.prefix_count, c.data.max_length, c.optimizer.learning_rate, c.train.epochs) == \
        ("runs/models/smollm2-135m", "derta", "derta", 50, 50, 256, 1e-4, 2.0)
    import smollm2  # configs/ is on sys.path through run_helpers
    assert smollm2.get_config().to_dict() == smollm2.get_config("").to_dict()
    with pytest.raises(ValueError, match="variant 'dpo_lora'"):
        smollm2.get_config("dpo_lora")


def test_smollm2_dpo_sees_the_vanilla_models_safety_triples_one_epoch():
    """The DPO variant's pairs: the 560 hand-written helpful pairs (their answer chosen, their
    weaker `rejected` answer rejected), then the 100 triples the vanilla variant was tuned on,
    safe chosen and harmful rejected: ceil(660 / 24) = 28 steps of 24 pairs."""
    import json
    from derta_jax.data import pipeline
    from derta_jax.training import config as config_lib
    runs = {v: config_lib.parse(parse(f"--config={ROOT / 'configs' / f'smollm2.py:{v}'}"))
            for v in ("vanilla", "dpo")}

    def records(variant):  # base template: no tokenizer; the hand-written helpful file only
        d = runs[variant].data
        return pipeline.mixture_records(d.recipe, d.source("safety"), pipeline.DEMO_HELPFUL,
                                        **d.counts())

    all_pairs, vanilla = records("dpo"), records("vanilla")
    helpful, pairs, seen = all_pairs[:560], all_pairs[560:], vanilla[560:]  # helpful first
    assert len(pairs) == len(seen) == 100
    assert [p.prefix for p in pairs] == [r.prefix for r in seen]
    assert [p.chosen for p in pairs] == [r.text for r in seen]  # the safe responses
    assert all(p.rejected != p.chosen for p in all_pairs)
    rows = [json.loads(line) for line in pipeline.DEMO_HELPFUL.read_text().splitlines()]
    assert [p.chosen for p in helpful] == [r.text for r in vanilla[:560]]
    assert all(r["rejected"] in p.rejected for p, r in zip(helpful, rows, strict=True))
    assert -(-len(all_pairs) // runs["dpo"].train.batch_size) == 28
