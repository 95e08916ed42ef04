"""The base run config: every key a run reads, with a one-line comment; `validate` checks them.

Config files under configs/ start from `base_config()` and only override. Nothing reads a key
that is not declared here, so every key can be set on the command line with the config locked
(`--config.train.steps=100`). Paths that are '' take the documented default.
"""
from __future__ import annotations

import json

import ml_collections

from derta_jax.data.recipe import RECIPES
from derta_jax.models.config import LORA_TARGETS, PRESETS, ModelConfig
from derta_jax.training.loss import NORMALISATIONS
from derta_jax.training.optimizer import SCHEDULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.checkpoint = ""  # model dir from `python -m derta_jax.convert` (config, params, tokenizer)
    m.init = "checkpoint"  # checkpoint: load its params | random: random init (tests, smoke runs)
    m.preset = ""  # with init=random and no checkpoint: a ModelConfig preset (models/config.py)
    m.arch_overrides = "{}"  # JSON dict of ModelConfig fields replacing the preset's (tiny models)
    m.tokenizer = ""  # tokenizer dir; '' = model.checkpoint
    m.dtype = "bfloat16"  # compute dtype (master weights stay in model.param_dtype)
    m.param_dtype = "float32"  # master weight and optimizer state dtype
    m.remat = "none"  # none | full | dots: activation rematerialisation per layer
    m.scan_layers = False  # nn.scan over layers (faster compile for deep models)
    m.attention_impl = "auto"  # auto | xla | cudnn
    m.lora_rank = 0  # 0 = full-parameter training; > 0 = LoRA with frozen base weights
    m.lora_alpha = 16.0  # LoRA scale numerator (scale = alpha / rank)
    m.lora_dropout = 0.0  # dropout on the LoRA input
    m.lora_targets = ",".join(LORA_TARGETS)  # comma-separated projections that get adapters

    c.data = d = ml_collections.ConfigDict()
    d.recipe = "derta"  # derta | vanilla | recaug | rto_only (derta-method.md mixtures)
    d.safety = ""  # safety triples JSON lines; '' = the bundled demo data
    d.helpful = ""  # helpfulness pairs JSON lines; '' = the bundled demo data
    d.template = "base"  # base ("[INST] q [\\INST]", official) | chat (the tokenizer's template)
    d.cut = "word"  # harmful-prefix cut: word (official) | token (re-drawn every epoch)
    d.refusal_token = "Sorry"  # RTO target; must be one token
    d.max_length = 1024  # tokens per example and per packed row
    d.packing = True  # pack several examples per row (False: one example per padded row)
    d.seed = 0  # data shuffling and cut seed
    d.helpful_count = -1  # helpful pairs used; -1 = all (official)
    d.rto_count = -1  # RTO examples; -1 = the recipe's official count
    d.prefix_count = -1  # harmful-prefix MLE examples; -1 = official
    d.vanilla_count = -1  # vanilla safety examples; -1 = official
    d.skip_invalid = False  # skip malformed JSON lines instead of stopping

    c.loss = lo = ml_collections.ConfigDict()
    lo.rto_keep = 1.0  # share of RTO positions keeping their loss per step (official full-param: 0.05)
    lo.normalisation = "token"  # token: one mean over the global batch (official) | sequence
    lo.chunk_size = 256  # sequence chunk for the LM head + cross-entropy (memory vs speed)
    lo.router_coef = 0.0  # MoE load-balancing loss weight (transformers adds none by default)

    c.optimizer = o = ml_collections.ConfigDict()
    o.learning_rate = 2e-5  # peak learning rate
    o.schedule = "cosine"  # cosine (to 0 after warmup) | constant
    o.warmup_ratio = 0.03  # share of steps with linear warmup
    o.weight_decay = 0.0  # AdamW decoupled weight decay (not on norms or biases)
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.999  # Adam beta2
    o.eps = 1e-8  # Adam epsilon
    o.grad_clip = 1.0  # global-norm gradient clipping; 0 = off

    c.mesh = me = ml_collections.ConfigDict()
    me.data = -1  # data-parallel axis size; -1 = the devices left over
    me.fsdp = 1  # fully-sharded data-parallel axis (params sharded over "embed")
    me.tensor = 1  # tensor-parallel axis (heads, mlp, vocab)

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 500  # save every N steps (and always at the end)
    ck.keep = 3  # keep the last K checkpoints
    ck.async_save = True  # write checkpoints in the background

    c.train = t = ml_collections.ConfigDict()
    t.seed = 0  # model init, RTO keep draws and dropout
    t.batch_size = 128  # global batch in rows (sequences of data.max_length)
    t.accum_steps = 1  # micro-batches per step (gradient accumulation)
    t.epochs = 2.0  # used when train.steps = -1: epochs over the examples (their tokens if packed)
    t.steps = -1  # optimizer steps; -1 = from train.epochs
    t.log_every = 1  # write metrics every N steps
    t.peak_tflops = 0.0  # per-device peak for perf/mfu; 0 = measure a matmul at start
    t.stop_at = -1  # save and exit after this step, as a preempted run would; -1 = run to the end
    return c


def model_config(config: ml_collections.ConfigDict, base: ModelConfig) -> ModelConfig:
    """The run's ModelConfig: `base` (from the checkpoint or preset) with the runtime keys set."""
    m = config.model
    return base.replace(
        dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
        attention_impl=m.attention_impl, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        lora_targets=tuple(s.strip() for s in m.lora_targets.split(",") if s.strip()))


def preset_model(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture for a random init without checkpoint: preset + arch_overrides."""
    overrides = json.loads(config.model.arch_overrides)
    if "eos_token_ids" in overrides:
        overrides["eos_token_ids"] = tuple(overrides["eos_token_ids"])
    return PRESETS[config.model.preset].replace(**overrides)


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"config {key}={value!r}: expected {expected}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first offending key and value."""
    m, d, t = config.model, config.data, config.train
    _check(m.init in ("checkpoint", "random"), "model.init", m.init, "checkpoint or random")
    if m.init == "checkpoint" or not m.preset:
        _check(bool(m.checkpoint), "model.checkpoint", m.checkpoint,
               "a model dir (or model.init=random with model.preset)")
    if m.preset:
        _check(m.preset in PRESETS, "model.preset", m.preset, f"one of {', '.join(PRESETS)}")
    try:
        overrides = json.loads(m.arch_overrides)
    except json.JSONDecodeError as e:
        raise ValueError(f"config model.arch_overrides={m.arch_overrides!r}: not JSON ({e})") from e
    _check(isinstance(overrides, dict), "model.arch_overrides", m.arch_overrides, "a JSON object")
    _check(bool(m.tokenizer or m.checkpoint), "model.tokenizer", m.tokenizer,
           "a tokenizer dir when model.checkpoint is empty")
    _check(m.lora_rank >= 0, "model.lora_rank", m.lora_rank, ">= 0")
    _check(0.0 <= m.lora_dropout < 1.0, "model.lora_dropout", m.lora_dropout, "in [0, 1)")
    _check(d.recipe in RECIPES, "data.recipe", d.recipe, f"one of {RECIPES}")
    _check(d.template in ("base", "chat"), "data.template", d.template, "base or chat")
    _check(d.cut in ("word", "token"), "data.cut", d.cut, "word or token")
    _check(d.max_length >= 8, "data.max_length", d.max_length, ">= 8")
    lo = config.loss
    _check(0.0 < lo.rto_keep <= 1.0, "loss.rto_keep", lo.rto_keep, "in (0, 1]")
    _check(lo.normalisation in NORMALISATIONS, "loss.normalisation", lo.normalisation,
           f"one of {NORMALISATIONS}")
    _check(lo.chunk_size >= 1, "loss.chunk_size", lo.chunk_size, ">= 1")
    o = config.optimizer
    _check(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "> 0")
    _check(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"one of {SCHEDULES}")
    _check(0.0 <= o.warmup_ratio < 1.0, "optimizer.warmup_ratio", o.warmup_ratio, "in [0, 1)")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _check(t.accum_steps >= 1 and t.batch_size % t.accum_steps == 0, "train.accum_steps",
           t.accum_steps, f"a divisor of train.batch_size={t.batch_size}")
    _check(t.steps == -1 or t.steps >= 1, "train.steps", t.steps, "-1 or >= 1")
    _check(t.steps != -1 or t.epochs > 0, "train.epochs", t.epochs, "> 0 when train.steps = -1")
    _check(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    ck = config.checkpoint
    _check(ck.every_steps >= 1, "checkpoint.every_steps", ck.every_steps, ">= 1")
    _check(ck.keep >= 1, "checkpoint.keep", ck.keep, ">= 1")
