"""The training loop: model + data + sharded state, checkpoints with exact resume, metrics.

    metrics = train(config, workdir)

Resumes from <workdir>/checkpoints when it holds a checkpoint (params, optimizer, step, rng and
the data iterator), so a stopped run continues as if never stopped. Metrics are fetched one step
late (the host never waits on the step it just launched); a non-finite loss stops the run.
SIGTERM saves a checkpoint at the current step and returns.

Every process reads the same global batch (the loader is not sharded by host) and keeps its own
rows, so a run gives the same numbers on any number of processes; packing is cheap next to a step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from derta_jax.checkpoints import model_dir
from derta_jax.data import loader as loader_lib
from derta_jax.data import pipeline
from derta_jax.models import layout
from derta_jax.models.config import ModelConfig
from derta_jax.training import checkpointing as ckpt
from derta_jax.training import config as config_lib
from derta_jax.training import optimizer as opt_lib
from derta_jax.training import perf
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib

log = logging.getLogger(__name__)


def load_model(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Any]:
    """The run's ModelConfig (checkpoint's or preset's architecture) and tokenizer."""
    m = config.model
    tokenizer = model_dir.load_tokenizer(m.tokenizer or m.checkpoint)
    base = model_dir.load_config(m.checkpoint) if m.checkpoint else config_lib.preset_model(config)
    return config_lib.model_config(config, base), tokenizer


def load_params(config: ml_collections.ConfigDict, cfg: ModelConfig, shardings: Any) -> Any:
    """The checkpoint's params placed on `shardings`, or None for a random init."""
    if config.model.init == "random":
        return None
    if not cfg.scan_layers:
        return model_dir.load_model_dir(config.model.checkpoint, dtype=cfg.param_dtype,
                                        shardings=shardings)[1]
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    _, params = model_dir.load_model_dir(config.model.checkpoint, dtype=cfg.param_dtype,
                                         shardings=cpu)
    return jax.device_put(layout.stack_layers(params), shardings)


def load_examples(config: ml_collections.ConfigDict, tokenizer: Any) -> list[Any]:
    d = config.data
    counts = {f"{p}_count": (None if d[f"{p}_count"] < 0 else d[f"{p}_count"])
              for p in ("helpful", "rto", "prefix", "vanilla")}
    counts = {k: v for k, v in counts.items() if v is not None}
    examples, _ = pipeline.training_examples(  # logs what it kept, truncated and dropped
        tokenizer, recipe=d.recipe, safety=d.safety or pipeline.DEMO_SAFETY,
        helpful=d.helpful or pipeline.DEMO_HELPFUL, max_length=d.max_length,
        refusal_token=d.refusal_token, template=d.template, cut=d.cut, seed=d.seed,
        skip_invalid=d.skip_invalid, **counts)
    return examples


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows of the global batch (process-major devices)."""
    n, i = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}


def total_steps(config: ml_collections.ConfigDict, examples: list[Any]) -> int:
    """train.steps, or train.epochs over the data: rows per epoch are the examples (padded) or,
    packed, their tokens over data.max_length (a lower bound: packing leaves some padding)."""
    t = config.train
    if t.steps > 0:
        return t.steps
    if config.data.packing:
        rows = sum(min(len(ex.tokens), config.data.max_length) for ex in examples) \
            / config.data.max_length
    else:
        rows = len(examples)
    return max(1, math.ceil(t.epochs * rows / t.batch_size))


class MetricsWriter:
    """metrics.jsonl, TensorBoard and the progress bar; a no-op on processes other than 0."""

    def __init__(self, workdir: pathlib.Path, start: int, total: int):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(workdir / "tensorboard"))
        self.bar = tqdm.tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, float], log_line: bool) -> None:
        if not self.active:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                             tok_s=f"{metrics.get('perf/tokens_per_s', 0.0):.0f}")
        if log_line:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.jsonl.close()
            self.tb.close()


def write_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, cfg: ModelConfig,
                  tokenizer: Any) -> None:
    """config.json and model/ (model_config.json + tokenizer) so eval/export can read the run."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=2))
    model_dir.save_model_dir(workdir / "model", cfg, None, tokenizer)


class _Preemption:
    """Records SIGTERM so the loop can save and stop between steps."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def requested_anywhere(self) -> bool:
        """True on every process once any process got SIGTERM, so all of them save the same step
        (a collective per step, only when there are several processes)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class _Logger:
    """Fetches a step's metrics (one step late), adds perf/*, checks the loss, writes them."""

    def __init__(self, writer: MetricsWriter, flops_per_token: float, peak_flops: float,
                 every: int):
        self.writer, self.flops, self.peak, self.every = writer, flops_per_token, peak_flops, every
        self.since = time.perf_counter()

    def __call__(self, step: int, metrics: dict[str, jax.Array], tokens: int) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if not math.isfinite(host["loss"]):
            raise FloatingPointError(
                f"loss is {host['loss']} at step {step} (loss/mle={host['loss/mle']}, "
                f"loss/rto={host['loss/rto']}, norm/grad={host['norm/grad']}); lower "
                "optimizer.learning_rate or check the data")
        host["perf/tokens_per_s"] = tokens / max(now - self.since, 1e-9)
        host["perf/mfu"] = host["perf/tokens_per_s"] * self.flops / self.peak
        self.since = now
        self.writer.write(step, host, log_line=step % self.every == 0 or step == 1)
        return host


def step_config(config: ml_collections.ConfigDict, cfg: ModelConfig) -> step_lib.StepConfig:
    lo = config.loss
    return step_lib.StepConfig(cfg, step_lib.LossConfig(
        rto_keep=lo.rto_keep, normalisation=lo.normalisation, chunk_size=lo.chunk_size,
        router_coef=lo.router_coef), config.train.accum_steps)


def make_optimizer(config: ml_collections.ConfigDict, steps: int):
    o = config.optimizer
    return opt_lib.make_optimizer(opt_lib.OptimizerConfig(
        learning_rate=o.learning_rate, schedule=o.schedule, warmup_ratio=o.warmup_ratio,
        weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip), steps)


@dataclasses.dataclass
class _Run:
    """Everything the step loop needs, restored from the last checkpoint when there is one."""

    cfg: ModelConfig
    steps: int
    start: int
    state: step_lib.State
    loader: Any
    mngr: Any
    train_step: Any
    mesh: Any


def _prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> _Run:
    mesh = shd.make_mesh(shd.MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    cfg, tokenizer = load_model(config)
    write_workdir(workdir, config, cfg, tokenizer)
    examples = load_examples(config, tokenizer)
    steps = total_steps(config, examples)
    if config.train.batch_size % jax.process_count():
        raise ValueError(f"config train.batch_size={config.train.batch_size} is not divisible by "
                         f"the {jax.process_count()} processes")
    loader = loader_lib.make_loader(examples, config.train.batch_size, config.data.max_length,
                                    seed=config.data.seed, packing=config.data.packing,
                                    shard_index=0, shard_count=1)
    tx, schedule = make_optimizer(config, steps)
    abstract, shardings = step_lib.state_shardings(cfg, tx, mesh)
    mngr = ckpt.make_manager(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    start = ckpt.latest_step(mngr)
    if start is None:
        params = load_params(config, cfg, shardings["params"])
        state = step_lib.init_state(jax.random.PRNGKey(config.train.seed), cfg, tx, mesh, params)
        start = 0
    else:
        log.info("resuming from %s/%d", mngr.directory, start)
        state = ckpt.restore(mngr, start, shardings, abstract, loader)
    train_step = step_lib.make_train_step(step_config(config, cfg), tx, schedule, mesh, shardings)
    return _Run(cfg, steps, start, state, loader, mngr, train_step, mesh)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Runs (or resumes) training; returns the last step's metrics. With `train.stop_at` it saves
    and returns after that step, as a preempted run would."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir).absolute()
    run = _prepare(config, workdir)
    t = config.train
    per_device = t.peak_tflops * 1e12 if t.peak_tflops > 0 else perf.measure_matmul_flops(
        dtype=run.cfg.dtype)
    log.info("perf/mfu against %.1f TFLOP/s per device (%s)", per_device / 1e12,
             "train.peak_tflops" if t.peak_tflops > 0 else f"measured {run.cfg.dtype} matmul")
    writer = MetricsWriter(workdir, run.start, run.steps)
    logger = _Logger(writer, perf.train_flops_per_token(run.cfg, config.data.max_length),
                     per_device * jax.device_count(), t.log_every)
    preemption = _Preemption()
    try:
        return _loop(run, config.checkpoint.every_steps, t.stop_at, logger, preemption)
    finally:
        run.mngr.wait_until_finished()
        run.mngr.close()
        writer.close()
        preemption.restore()


def _loop(run: _Run, every: int, stop_at: int, logger: _Logger,
          preemption: _Preemption) -> dict[str, float]:
    """The steps; metrics of step t are fetched after step t+1 is launched."""
    base_rng = jax.device_get(run.state["rng"])
    state, step, pending, last = run.state, run.start, None, {}
    while step < run.steps:
        batch = next(run.loader)
        tokens = int(np.count_nonzero(batch["segment_ids"]))
        state, metrics = run.train_step(state, shd.shard_batch(local_rows(batch), run.mesh),
                                        jax.random.fold_in(base_rng, step))
        step += 1
        if pending is not None:
            last = logger(*pending)
        pending = (step, metrics, tokens)
        stop = step == stop_at or preemption.requested_anywhere()
        if step % every == 0 or step == run.steps or stop:
            ckpt.save(run.mngr, step, state, run.loader)
        if stop:
            break
    if pending is not None:
        last = logger(*pending)
    return last
