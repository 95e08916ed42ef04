"""The training loop: model + data + sharded state, checkpoints with exact resume, metrics.

    metrics = train(config, workdir)

Resumes from <workdir>/checkpoints when it holds a checkpoint (params, optimizer, step, rng and
the data iterator), so a stopped run continues as if never stopped. Metrics are fetched one step
late (the host never waits on the step it just launched); a non-finite loss stops the run.
SIGTERM saves a checkpoint at the current step and returns.

Every process reads the same global batch (the loader is not sharded by host) and keeps its own
rows, so a run gives the same numbers on any number of processes; packing is cheap next to a step.
At start the data plan (examples, examples per step, rows per step, steps per epoch, total steps,
padding share) is logged and written to <workdir>/plan.json.
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
from derta_jax.training import perf
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib

log = logging.getLogger(__name__)


def model_and_tokenizer(run: config_lib.RunConfig) -> tuple[ModelConfig, Any]:
    """The run's ModelConfig (checkpoint's or preset's architecture) and tokenizer."""
    src = run.source
    tokenizer = model_dir.load_tokenizer(src.tokenizer or src.checkpoint)
    base = model_dir.load_config(src.checkpoint) if src.checkpoint else run.preset_model()
    return run.model_config(base), tokenizer


def load_params(run: config_lib.RunConfig, cfg: ModelConfig, shardings: Any) -> Any:
    """The checkpoint's params placed on `shardings`, or None for a random init."""
    if run.source.init == "random":
        return None
    if not cfg.scan_layers:
        return model_dir.load_model_dir(run.source.checkpoint, dtype=cfg.param_dtype,
                                        shardings=shardings)[1]
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    _, params = model_dir.load_model_dir(run.source.checkpoint, dtype=cfg.param_dtype,
                                         shardings=cpu)
    return jax.device_put(layout.stack_layers(params), shardings)


def load_examples(d: config_lib.DataConfig, tokenizer: Any) -> list[Any]:
    examples, _ = pipeline.training_examples(  # logs what it kept, truncated and dropped
        tokenizer, recipe=d.recipe, safety=d.safety or pipeline.DEMO_SAFETY,
        helpful=d.helpful or pipeline.DEMO_HELPFUL, max_length=d.max_length,
        refusal_token=d.refusal_token, template=d.template, cut=d.cut, seed=d.seed,
        skip_invalid=d.skip_invalid, eos_text=d.eos_text, **d.counts())
    return examples


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows of the global batch (process-major devices)."""
    n, i = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}


def make_plan(run: config_lib.RunConfig, examples: list[Any], mesh: Any) -> loader_lib.Plan:
    """The data plan: train.batch_size examples per step, packed into a row count that the data
    axes, the micro-batches and the processes all divide."""
    t, d = run.train, run.data
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    multiple = math.lcm(data_shards, t.accum_steps, jax.process_count())
    return loader_lib.make_plan(examples, t.batch_size, d.max_length, d.seed, epochs=t.epochs,
                                steps=t.steps if t.steps > 0 else None, packing=d.packing,
                                row_multiple=multiple)


def log_plan(plan: loader_lib.Plan, workdir: pathlib.Path) -> None:
    log.info("data plan: %d examples, %d per step, %d rows of %d tokens per step, %d steps per "
             "epoch, %d steps, %.1f%% of token slots padding", plan.examples, plan.batch_size,
             plan.rows_per_step, plan.seq_len, plan.steps_per_epoch, plan.total_steps,
             100 * plan.pad_share)
    if jax.process_index() == 0:
        (workdir / "plan.json").write_text(plan.to_json())


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


def _prepare(run_cfg: config_lib.RunConfig, config: ml_collections.ConfigDict,
             workdir: pathlib.Path) -> _Run:
    mesh = shd.make_mesh(run_cfg.mesh)
    cfg, tokenizer = model_and_tokenizer(run_cfg)
    write_workdir(workdir, config, cfg, tokenizer)
    examples = load_examples(run_cfg.data, tokenizer)
    plan = make_plan(run_cfg, examples, mesh)
    log_plan(plan, workdir)
    loader = loader_lib.make_loader(examples, plan, run_cfg.data.seed)
    setup = step_lib.build(step_lib.StepConfig(cfg, run_cfg.loss, run_cfg.optimizer,
                                               run_cfg.train.accum_steps), mesh, plan.total_steps)
    mngr = ckpt.make_manager(workdir, run_cfg.checkpoint.keep, run_cfg.checkpoint.async_save)
    start = ckpt.latest_step(mngr)
    if start is None:
        params = load_params(run_cfg, cfg, setup.shardings["params"])
        state = setup.init(jax.random.PRNGKey(run_cfg.train.seed), params)
        start = 0
    else:
        log.info("resuming from %s/%d", mngr.directory, start)
        state = ckpt.restore(mngr, start, setup.shardings, setup.abstract, loader)
    return _Run(cfg, plan.total_steps, start, state, loader, mngr, setup.train_step, mesh)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Runs (or resumes) training; returns the last step's metrics. With `train.stop_at` it saves
    and returns after that step, as a preempted run would."""
    run_cfg = config_lib.parse(config)
    workdir = pathlib.Path(workdir).absolute()
    run = _prepare(run_cfg, config, workdir)
    t = run_cfg.train
    per_device = t.peak_tflops * 1e12 if t.peak_tflops > 0 else perf.measure_matmul_flops(
        dtype=run.cfg.dtype)
    log.info("perf/mfu against %.1f TFLOP/s per device (%s)", per_device / 1e12,
             "train.peak_tflops" if t.peak_tflops > 0 else f"measured {run.cfg.dtype} matmul")
    writer = MetricsWriter(workdir, run.start, run.steps)
    logger = _Logger(writer, perf.train_flops_per_token(run.cfg, run_cfg.data.max_length),
                     per_device * jax.device_count(), t.log_every)
    preemption = _Preemption()
    try:
        return _loop(run, run_cfg.checkpoint.every_steps, t.stop_at, logger, preemption)
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
