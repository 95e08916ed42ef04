"""LLaMA-3 DeRTa runs with the paper's hyperparameters (derta-method.md, "Hyperparameters").

    python -m derta_jax.convert --hf /path/Meta-Llama-3-8B --out models/llama3-8b
    python -m derta_jax.train --config=configs/llama3.py:8b --workdir runs/llama3-8b-derta

Variants (`:variant[,recipe]`, recipe one of derta | vanilla | recaug | rto_only, default derta):
  8b                 full parameter, lr 2e-5 cosine, warmup 0.03, wd 2e-5 on every tensor (norms
                     included, as DeepSpeed's AdamW), max len 1024, the official refusal-token
                     dropout: max(1, ceil(L/20)) random positions of each row keep their RTO loss
  70b_lora           LoRA rank 96 / alpha 16 / dropout 0.05 on q,k,v,o,gate,up,down, lr 1e-4
                     linearly decayed to 0 (the HF Trainer default: train.sh sets no scheduler),
                     no warmup, wd 0, max len 512, all RTO positions kept
  70b_instruct_lora  the same on LLaMA-3-70B-Instruct
  8b_dpo             the paper's DPO baseline (Figure 5, Appendix B): one epoch of DPO (β 0.1, TRL's
                     default) on top of the vanilla safety-tuned 8B (`:8b,vanilla`, then
                     `python -m derta_jax.export` and `python -m derta_jax.convert --hf` into
                     models/llama3-8b-vanilla), lr 5e-7, full parameter: the reference log-probs
                     are computed once at start (<workdir>/reference_logps.npz); pairs: helpful rows
                     with a `rejected` answer (the paper: Qwen1.5-0.5B-chat's) and every safety
                     triple (safe chosen, harmful rejected); data.max_length 2048 is the pair's
                     budget, 1024 tokens per response sequence as the official block size
  70b_dpo_lora       the same on the vanilla-tuned 70B with the LoRA settings, lr 2e-6; the frozen
                     base is the reference (no second copy of the weights); 512 tokens per sequence
All (the official protocol, derta-method.md "Batching"): 128 examples per optimizer step, packed
into a fixed number of rows (the plan is logged and written to <workdir>/plan.json), 2 epochs of
ceil(examples / 128) steps (~1,030 steps for 66K examples), base template ending every response
with the literal `<|end_of_text|>`, bf16 compute with fp32 masters. Expected outcome: on the
paper's data, attack success rates near the DeRTa rows of its Table 2 (e.g. 70B
CompletionAttack ~4%).

Our preferences, available as options: `--config.loss.rto_keep_rule=at_least_one` (every response
keeps at least one RTO position), `--config.optimizer.decay_norms=False` (no decay on norm scales),
`--config.optimizer.schedule=cosine` for LoRA, `--config.data.packing=False` (one example per row).
"""
from derta_jax.training.config import base_config

CHECKPOINTS = {"8b": "models/llama3-8b", "70b_lora": "models/llama3-70b",
               "70b_instruct_lora": "models/llama3-70b-instruct",
               "8b_dpo": "models/llama3-8b-vanilla", "70b_dpo_lora": "models/llama3-70b-vanilla"}
# The architecture of each checkpoint, so `python -m derta_jax.plan` needs no weights.
PRESETS = {"8b": "llama3-8b", "70b_lora": "llama3-70b", "70b_instruct_lora": "llama3-70b",
           "8b_dpo": "llama3-8b", "70b_dpo_lora": "llama3-70b"}
DPO = {"8b_dpo": 5e-7, "70b_dpo_lora": 2e-6}  # the paper's DPO learning rates


def full_parameter(c):
    # Fits v5p-64 as one step of 128 rows (33.32 of 95 GiB per chip); on 8 x H100 add
    # --config.train.accum_steps=16 (`python -m derta_jax.plan`, benchmarks/README.md).
    c.optimizer.learning_rate = 2e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 2e-5
    c.optimizer.decay_norms = True
    c.data.max_length = 1024
    c.loss.rto_keep = 0.05
    c.loss.rto_keep_rule = "official"
    return c


def lora(c):
    c.model.lora_rank = 96
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.05
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.data.max_length = 512
    c.loss.rto_keep = 1.0
    # One layer body to compile instead of 80 (`python -m derta_jax.plan` for 70B on v5p-64: the
    # scanned step compiles in 160-280 s here; benchmarks/README.md, "Will it fit?").
    c.model.scan_layers = True
    return c


def paper_defaults(c, checkpoint: str, recipe: str, preset: str):
    c.model.checkpoint = checkpoint
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.data.recipe = recipe
    c.data.template = "base"
    c.data.eos_text = "<|end_of_text|>"
    c.data.packing = True
    c.train.batch_size = 128
    c.train.epochs = 2.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


def parse(arg: str | None, default: str) -> tuple[str, str]:
    variant, _, recipe = (arg or default).partition(",")
    return variant, recipe or "derta"


def dpo(c, learning_rate: float):
    c.loss.objective = "dpo"
    c.loss.beta = 0.1
    c.data.max_length *= 2  # a pair's two sequences share one packed row
    c.optimizer.learning_rate = learning_rate
    c.train.epochs = 1.0
    return c


def get_config(arg=None):
    variant, recipe = parse(arg, "8b")
    if variant not in CHECKPOINTS:
        raise ValueError(f"configs/llama3.py variant {variant!r}: expected one of {list(CHECKPOINTS)}")
    if variant in DPO:
        if arg and "," in arg:
            raise ValueError(f"configs/llama3.py variant {variant!r} takes no recipe (its data are "
                             "the preference pairs)")
        recipe = "preference"
    c = paper_defaults(base_config(), CHECKPOINTS[variant], recipe, PRESETS[variant])
    c = full_parameter(c) if variant in ("8b", "8b_dpo") else lora(c)
    return dpo(c, DPO[variant]) if variant in DPO else c
