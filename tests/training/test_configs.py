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
