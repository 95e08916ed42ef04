"""LLaMA-3 DeRTa runs with the paper's hyperparameters (derta-method.md, "Hyperparameters").

    python -m derta_jax.convert --hf /path/Meta-Llama-3-8B --out models/llama3-8b
    python -m derta_jax.train --config=configs/llama3.py:8b --workdir runs/llama3-8b-derta

Variants (`:variant[,recipe]`, recipe one of derta | vanilla | recaug | rto_only, default derta):
  8b                 full parameter, lr 2e-5 cosine, warmup 0.03, wd 2e-5, max len 1024, 5% of RTO
                     positions kept per step (the official "95% dropout of the Sorry token")
  70b_lora           LoRA rank 96 / alpha 16 / dropout 0.05 on q,k,v,o,gate,up,down, lr 1e-4, no
                     warmup, wd 0, max len 512, all RTO positions kept
  70b_instruct_lora  the same on LLaMA-3-70B-Instruct
All: global batch 128, 2 epochs, bf16 compute with fp32 masters. Expected outcome: on the paper's
data, attack success rates near the DeRTa rows of its Table 2 (e.g. 70B CompletionAttack ~4%).
"""
from derta_jax.training.config import base_config

CHECKPOINTS = {"8b": "models/llama3-8b", "70b_lora": "models/llama3-70b",
               "70b_instruct_lora": "models/llama3-70b-instruct"}


def full_parameter(c):
    c.optimizer.learning_rate = 2e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 2e-5
    c.data.max_length = 1024
    c.loss.rto_keep = 0.05
    return c


def lora(c):
    c.model.lora_rank = 96
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.05
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.data.max_length = 512
    c.loss.rto_keep = 1.0
    return c


def paper_defaults(c, checkpoint: str, recipe: str):
    c.model.checkpoint = checkpoint
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.data.recipe = recipe
    c.data.template = "base"
    c.train.batch_size = 128
    c.train.epochs = 2.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


def parse(arg: str | None, default: str) -> tuple[str, str]:
    variant, _, recipe = (arg or default).partition(",")
    return variant, recipe or "derta"


def get_config(arg=None):
    variant, recipe = parse(arg, "8b")
    if variant not in CHECKPOINTS:
        raise ValueError(f"configs/llama3.py variant {variant!r}: expected one of {list(CHECKPOINTS)}")
    c = paper_defaults(base_config(), CHECKPOINTS[variant], recipe)
    return full_parameter(c) if variant == "8b" else lora(c)
