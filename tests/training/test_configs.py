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
    if rank:
        assert (c.model.lora_alpha, c.model.lora_dropout, c.optimizer.warmup_ratio,
                c.optimizer.weight_decay) == (16.0, 0.05, 0.0, 0.0)
    else:
        assert (c.optimizer.schedule, c.optimizer.warmup_ratio, c.optimizer.weight_decay) == \
            ("cosine", 0.03, 2e-5)


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
