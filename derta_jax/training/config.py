"""The run config: one section per frozen dataclass, each setting declared once.

    c = base_config()                 # ConfigDict sections built from the dataclasses' defaults
    run = parse(c)                    # the dataclasses back from the sections, validated

Each section of `base_config()` is built from the fields and defaults of its dataclass, whose
one-line comments document the key:

    model       ModelSource (where the model comes from) + ModelConfig's runtime fields
                (models/config.py, RUNTIME_FIELDS; lora_targets is a comma-separated string)
    data        DataConfig (below)
    loss        training/loss.py LossConfig
    optimizer   training/optimizer.py OptimizerConfig
    mesh        training/sharding.py MeshConfig
    checkpoint  CheckpointConfig (below)
    train       TrainConfig (below)

Config files under configs/ start from `base_config()` and only override; the config is locked,
so every key can be set on the command line (`--config.train.steps=100`) and an unknown key is an
error. `parse` is the one place that validates: each dataclass checks its own fields, `parse` the
keys that depend on each other, and every error names `section.key` and the value.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from typing import Any

import ml_collections

from derta_jax.data import pipeline, records
from derta_jax.data.recipe import ALL_RECIPES, CUTS, PREFERENCE
from derta_jax.data.templates import ASSISTANT_TURNS
from derta_jax.models.config import PRESETS, RUNTIME_FIELDS, ModelConfig
from derta_jax.training.loss import LossConfig
from derta_jax.training.preference import PAIRS
from derta_jax.training.optimizer import OptimizerConfig
from derta_jax.training.sharding import MeshConfig


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    checkpoint: str = ""  # model dir from `python -m derta_jax.convert` (config, params, tokenizer)
    init: str = "checkpoint"  # checkpoint: load its params | random: random init (tests, smoke runs)
    preset: str = ""  # a ModelConfig preset (models/config.py): the architecture of a random
    # init without checkpoint, and the one `derta_jax.plan` compiles before the checkpoint exists
    arch_overrides: str = "{}"  # JSON dict of ModelConfig fields replacing the preset's (tiny models)
    tokenizer: str = ""  # tokenizer dir; '' = model.checkpoint

    def __post_init__(self):
        _check(self.init in ("checkpoint", "random"), "init", self.init, "checkpoint or random")
        if self.init == "checkpoint" or not self.preset:
            _check(bool(self.checkpoint), "checkpoint", self.checkpoint,
                   "a model dir (or model.init=random with model.preset)")
        if self.preset:
            _check(self.preset in PRESETS, "preset", self.preset, f"one of {', '.join(PRESETS)}")
        try:
            overrides = json.loads(self.arch_overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"arch_overrides={self.arch_overrides!r}: not JSON ({e})") from e
        _check(isinstance(overrides, dict), "arch_overrides", self.arch_overrides, "a JSON object")
        _check(bool(self.tokenizer or self.checkpoint), "tokenizer", self.tokenizer,
               "a tokenizer dir when model.checkpoint is empty")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    recipe: str = "derta"  # derta | vanilla | recaug | rto_only (the mixtures) | preference (pairs)
    safety: str = ""  # safety triples: JSON lines, parquet/arrow/json, dataset dir or hub name; '' = demo
    safety_split: str = "train"  # split of a hub name or a saved DatasetDict
    safety_revision: str = ""  # hub names: branch, tag or commit; '' = the default branch
    safety_columns: str = ""  # "query=prompt,safe_response=chosen,..." our field=its column; '' = ours
    helpful: str = ""  # helpfulness pairs, any of data.safety's kinds (a,b: both); '' = demo data
    helpful_split: str = "train"  # split of a hub name or a saved DatasetDict
    helpful_revision: str = ""  # hub names: branch, tag or commit; '' = the default branch
    helpful_columns: str = ""  # "instruction=prompt,output=response" our field=its column; '' = ours
    template: str = "base"  # base ("[INST] q [\\INST]", official) | chat (the tokenizer's template)
    assistant_turns: str = "all"  # multi-turn rows (messages): loss on all assistant turns | last
    eos_text: str = "<|end_of_text|>"  # end of every base-template response (official literal)
    cut: str = "word"  # harmful-prefix cut: word (official) | token (re-drawn every epoch)
    refusal_token: str = "Sorry"  # RTO target; must be one token
    max_length: int = 1024  # tokens per example and per packed row
    packing: bool = True  # pack each step's examples into rows (False: one example per padded row)
    seed: int = 0  # data order and cut seed
    helpful_count: int = -1  # helpful pairs used; -1 = all (official)
    rto_count: int = -1  # RTO examples; -1 = up to the recipe's official count
    prefix_count: int = -1  # harmful-prefix MLE examples; -1 = up to the official count
    vanilla_count: int = -1  # vanilla safety examples; -1 = up to the official count
    pairs_count: int = -1  # recipe=preference: safety pairs (safe chosen, harmful rejected); -1 = all
    skip_invalid: bool = False  # skip malformed rows (counted) instead of stopping
    data_dir: str = ""  # where examples are prepared once and reused (a folder or gs:// URL); '' = $DERTA_JAX_DATA_DIR or ~/.cache/derta_jax

    def __post_init__(self):
        _check(self.recipe in ALL_RECIPES, "recipe", self.recipe, f"one of {ALL_RECIPES}")
        _check(self.template in ("base", "chat"), "template", self.template, "base or chat")
        _check(self.cut in CUTS, "cut", self.cut, f"one of {CUTS}")
        _check(self.assistant_turns in ASSISTANT_TURNS, "assistant_turns", self.assistant_turns,
               f"one of {ASSISTANT_TURNS}")
        _check(bool(self.eos_text), "eos_text", self.eos_text, "a non-empty string")
        _check(self.max_length >= 8, "max_length", self.max_length, ">= 8")
        for kind in ("safety", "helpful"):
            key = f"{kind}_columns"
            try:
                records.parse_columns(getattr(self, key), kind)
            except ValueError as e:
                raise ValueError(f"{key}={getattr(self, key)!r}: {e}") from None

    def source(self, kind: str) -> records.Source:
        """Where `kind` (safety | helpful) rows come from; '' is the bundled demo file."""
        return pipeline.source(self, kind)

    def counts(self) -> dict[str, int]:
        """The explicit counts (`<part>_count` >= 0) as keyword arguments of the data pipeline."""
        return {f"{p}_count": getattr(self, f"{p}_count")
                for p in ("helpful", "rto", "prefix", "vanilla", "pairs")
                if getattr(self, f"{p}_count") >= 0}


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # save every N steps (and always at the end)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True  # write checkpoints in the background
    restore_step: int = -1  # resume from this step (newer ones set aside); -1 = newest readable

    def __post_init__(self):
        _check(self.every_steps >= 1, "every_steps", self.every_steps, ">= 1")
        _check(self.keep >= 1, "keep", self.keep, ">= 1")
        _check(self.restore_step == -1 or self.restore_step >= 1, "restore_step", self.restore_step,
               "-1 or a saved step >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # model init, RTO keep draws and dropout
    batch_size: int = 128  # examples per optimizer step (official: 128), packed into a fixed row count
    accum_steps: int = 1  # micro-batches per step (gradient accumulation)
    epochs: float = 2.0  # used when train.steps = -1: steps = ceil(epochs * ceil(examples / batch))
    steps: int = -1  # optimizer steps; -1 = from train.epochs
    log_every: int = 1  # write metrics every N steps
    peak_tflops: float = 0.0  # per-device peak for perf/mfu; 0 = measure a matmul at start
    stop_at: int = -1  # save and exit after this step, as a preempted run would; -1 = run to the end
    on_nonfinite: str = "stop"  # loss or norm/grad not finite: stop, unsaved | skip the update
    max_skipped_steps: int = 10  # on_nonfinite=skip: stop after this many skips in a row
    allow_config_change: bool = False  # resume though keys that change the run differ
    wandb_project: str = ""  # W&B project of the metrics (process 0; needs wandb); '' = off
    wandb_run: str = ""  # W&B run name ('' = W&B's); mode $WANDB_MODE, else online iff $WANDB_API_KEY

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.accum_steps >= 1, "accum_steps", self.accum_steps, ">= 1")
        _check(self.steps == -1 or self.steps >= 1, "steps", self.steps, "-1 or >= 1")
        _check(self.steps != -1 or self.epochs > 0, "epochs", self.epochs, "> 0 when train.steps = -1")
        _check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        _check(self.on_nonfinite in ("stop", "skip"), "on_nonfinite", self.on_nonfinite,
               "stop or skip")
        _check(self.max_skipped_steps >= 1, "max_skipped_steps", self.max_skipped_steps, ">= 1")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ValueError(f"wandb_project={self.wandb_project!r}: the wandb package is not "
                             "installed (pip install wandb, or leave train.wandb_project='')")
        _check(not self.wandb_run or bool(self.wandb_project), "wandb_run", self.wandb_run,
               "'' when train.wandb_project is ''")


SECTIONS = {"data": DataConfig, "loss": LossConfig, "optimizer": OptimizerConfig,
            "mesh": MeshConfig, "checkpoint": CheckpointConfig, "train": TrainConfig}


def defaults(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with the dataclasses' defaults."""
    runtime = {f: defaults(ModelConfig)[f] for f in RUNTIME_FIELDS}
    runtime["lora_targets"] = ",".join(runtime["lora_targets"])
    c = ml_collections.ConfigDict()
    c.model = {**defaults(ModelSource), **runtime}
    for name, cls in SECTIONS.items():
        c[name] = defaults(cls)
    return c


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The parsed run config: one dataclass per section."""

    source: ModelSource
    runtime: dict[str, Any]  # ModelConfig's runtime fields, applied to the architecture
    data: DataConfig
    loss: LossConfig
    optimizer: OptimizerConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    train: TrainConfig

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """The run's ModelConfig: `base` (the checkpoint's or preset's architecture) + runtime keys."""
        return base.replace(**self.runtime)

    def preset_model(self) -> ModelConfig:
        """The architecture for a random init without checkpoint: preset + arch_overrides."""
        overrides = json.loads(self.source.arch_overrides)
        if "eos_token_ids" in overrides:
            overrides["eos_token_ids"] = tuple(overrides["eos_token_ids"])
        return PRESETS[self.source.preset].replace(**overrides)


def _build(cls: type, name: str, values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"config {name}.{e}") from None


def parse(config: ml_collections.ConfigDict) -> RunConfig:
    """The section dataclasses from `config`; raises ValueError naming the first bad key and value."""
    m = config.model.to_dict()
    source = _build(ModelSource, "model", {f.name: m[f.name] for f in dataclasses.fields(ModelSource)})
    runtime = {f: m[f] for f in RUNTIME_FIELDS}
    runtime["lora_targets"] = tuple(s.strip() for s in str(m["lora_targets"]).split(",") if s.strip())
    _build(ModelConfig, "model", runtime)  # the runtime fields' own checks
    sections = {name: _build(cls, name, config[name].to_dict()) for name, cls in SECTIONS.items()}
    objective, recipe = sections["loss"].objective, sections["data"].recipe
    if (objective in PAIRS) != (recipe == PREFERENCE):
        raise ValueError(f"config loss.objective={objective!r} with data.recipe={recipe!r}: the "
                         f"pair objectives ({', '.join(PAIRS)}) train on data.recipe={PREFERENCE!r} "
                         "and it on them only")
    if objective == "constrained_sft" and recipe not in ("vanilla", "recaug"):
        raise ValueError(f"config loss.objective='constrained_sft' with data.recipe={recipe!r}: it "
                         "trains on plain responses (vanilla, or recaug's harmful-prefix recovery "
                         "examples as Qi et al. do), not on RTO positions")
    return RunConfig(source=source, runtime=runtime, **sections)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first offending key and value."""
    parse(config)
