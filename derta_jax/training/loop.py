"""The training loop: model + data + sharded state, checkpoints with exact resume, metrics.

    metrics = train(config, workdir)

Resumes from <workdir>/checkpoints when it holds a checkpoint (params, optimizer, step, rng and
the data iterator), so a stopped run continues as if never stopped: the newest step that reads
completely wins (training/checkpointing.py), metrics.jsonl rows (and TensorBoard events) after it
are dropped, so every logged step has exactly one row after any sequence of kills. With
train.wandb_project the same rows go to W&B too (process 0; workdir.open_wandb). Metrics are
fetched one step late (the host never waits on the step it just launched), except that a step's
row is written before its checkpoint is saved. A step whose loss or norm/grad is not finite is
never saved: with train.on_nonfinite=stop the run stops naming the step and its examples; with
skip its update is not applied (train/skipped_steps), and train.max_skipped_steps in a row stop
the run. SIGTERM saves a checkpoint at the current step and returns.

A workdir is used by one trainer at a time (<workdir>/lock, training/workdir.py). A resumed run
compares its config with <workdir>/config.json and refuses keys that change the run (unless
train.allow_config_change); config.json is written once the run is restored (a changed one keeps
the previous as config.<step>.json). A finished run rerun says so and returns.

Every process reads the same global batch (the loader is not sharded by host) and keeps its own
rows, so a run gives the same numbers on any number of processes; packing is cheap next to a step.
At start the data plan (examples, examples per step, rows per step, steps per epoch, total steps,
padding share) is logged and written to <workdir>/plan.json. A full-parameter DPO, IPO or
constrained-SFT run first computes its reference log-probs with the starting params
(training/reference.py, <workdir>/reference_logps.npz), read back on resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm
from etils import epath
from flax import traverse_util

from derta_jax import storage
from derta_jax.checkpoints import model_dir, resolve
from derta_jax.data import loader as loader_lib
from derta_jax.data import prepared
from derta_jax.models.config import ModelConfig
from derta_jax.training import checkpointing as ckpt
from derta_jax.training import config as config_lib
from derta_jax.training import perf
from derta_jax.training import reference
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib
from derta_jax.training import workdir as workdir_lib

log = logging.getLogger(__name__)


def start_checkpoint(run: config_lib.RunConfig) -> resolve.Checkpoint | None:
    """model.checkpoint when it is a training workdir (its newest step) or one of its steps, as
    the DPO baseline starts from a vanilla-tuned run; None for a model dir or a random init."""
    if run.source.init == "random" or not run.source.checkpoint or \
            (storage.path(run.source.checkpoint) / model_dir.PARAMS_DIR).is_dir():
        return None
    return resolve.resolve_checkpoint(run.source.checkpoint)


def model_and_tokenizer(run: config_lib.RunConfig) -> tuple[ModelConfig, Any]:
    """The run's ModelConfig (checkpoint's or preset's architecture) and tokenizer."""
    src, start = run.source, start_checkpoint(run)
    if start is not None:
        tokenizer = model_dir.load_tokenizer(src.tokenizer or start.tokenizer_dir)
        return run.model_config(start.cfg), tokenizer
    tokenizer = model_dir.load_tokenizer(src.tokenizer or src.checkpoint)
    base = model_dir.load_config(src.checkpoint) if src.checkpoint else run.preset_model()
    return run.model_config(base), tokenizer


def load_params(run: config_lib.RunConfig, cfg: ModelConfig, shardings: Any) -> Any:
    """The checkpoint's params placed on `shardings`, or None for a random init. A model dir or a
    training workdir is read one tensor at a time (a workdir's LoRA adapters merged in), each
    process reading only the slices its own devices hold: no host reads more than its share of
    the model. A `scan_layers` run's stacks are filled layer by layer on each device's shard."""
    if run.source.init == "random":
        return None
    source = start_checkpoint(run) or resolve.resolve_checkpoint(run.source.checkpoint)
    dtype, onto = jnp.dtype(cfg.param_dtype), traverse_util.flatten_dict(shardings)
    flat = {}
    for path in source.params:
        if not cfg.scan_layers or not path[0].startswith("layers_"):
            flat[path] = source.on_devices(path, onto[path], dtype)
        elif path[0] == "layers_0":
            layers = [(f"layers_{i}",) + path[1:] for i in range(cfg.num_layers)]
            flat[("layers",) + path[1:]] = source.stacked_on_devices(
                layers, onto[("layers",) + path[1:]], dtype)
    return traverse_util.unflatten_dict(flat)


def load_examples(d: config_lib.DataConfig, tokenizer: Any) -> Sequence[Any]:
    """The run's tokenised examples, prepared once into data.data_dir and read by random access
    (data/prepared.py); what was kept, truncated and dropped is logged on every start."""
    return prepared.examples(d, tokenizer)


def row_multiple(mesh: Any, accum_steps: int, processes: int) -> int:
    """What the rows of a step must be a multiple of: the data axes, the micro-batches and the
    processes all divide them."""
    return math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], accum_steps, processes)


def step_config(run: config_lib.RunConfig, cfg: ModelConfig) -> step_lib.StepConfig:
    """The train step's config (what training and `derta_jax.plan` build the step from)."""
    t = run.train
    return step_lib.StepConfig(cfg, run.loss, run.optimizer, t.accum_steps,
                               skip_nonfinite=t.on_nonfinite == "skip")


def make_plan(run: config_lib.RunConfig, examples: list[Any], mesh: Any) -> loader_lib.Plan:
    """The data plan: train.batch_size examples per step, packed into a row count that the data
    axes, the micro-batches and the processes all divide."""
    t, d = run.train, run.data
    return loader_lib.make_plan(examples, t.batch_size, d.max_length, d.seed, epochs=t.epochs,
                                steps=t.steps if t.steps > 0 else None, packing=d.packing,
                                row_multiple=row_multiple(mesh, t.accum_steps,
                                                          jax.process_count()))


def log_plan(plan: loader_lib.Plan) -> None:
    log.info("data plan: %d examples, %d per step, %d rows of %d tokens per step, %d steps per "
             "epoch, %d steps, %.1f%% of token slots padding", plan.examples, plan.batch_size,
             plan.rows_per_step, plan.seq_len, plan.steps_per_epoch, plan.total_steps,
             100 * plan.pad_share)


class MetricsWriter:
    """metrics.jsonl, TensorBoard, W&B (train.wandb_project) and the progress bar; a no-op on
    processes other than 0. Every logged row goes to all three.

    Rows after `start` (written by a run killed before its next checkpoint) are dropped first;
    TensorBoard is told to purge its events from step start + 1 on. In a bucket workdir, where an
    object is rewritten to append to it, the rows and the TensorBoard events (written to a local
    folder first) are uploaded before each checkpoint and at the end."""

    def __init__(self, workdir: epath.Path, start: int, total: int,
                 config: ml_collections.ConfigDict):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter
        workdir_lib.truncate_metrics(workdir, start)
        self.jsonl, self.rows, self.remote = workdir / workdir_lib.METRICS_FILE, [], \
            storage.is_url(workdir)
        self.tb_dir = workdir / "tensorboard"
        self.tb = SummaryWriter(str(storage.temp_dir() if self.remote else self.tb_dir),
                                purge_step=start + 1 if start > 0 else None)
        self.wandb = workdir_lib.open_wandb(config, workdir)
        self.bar = tqdm.tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, float], log_line: bool) -> None:
        if not self.active:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                             tok_s=f"{metrics.get('perf/tokens_per_s', 0.0):.0f}")
        if log_line:
            self.rows.append(workdir_lib.json_row(step, metrics) + "\n")
            if not self.remote:
                self._write_rows()
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            if self.wandb is not None:
                self.wandb.log(dict(metrics), step=step)

    def _write_rows(self) -> None:
        if self.rows:
            storage.append_text(self.jsonl, "".join(self.rows))
            self.rows = []

    def _upload_events(self) -> None:
        if self.remote:
            storage.upload(self.tb.logdir, self.tb_dir)

    def flush(self) -> None:
        """Before a checkpoint: the rows of every step it holds are on disk."""
        if self.active:
            self._write_rows()
            self.tb.flush()
            self._upload_events()

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self._write_rows()
            self.tb.close()
            self._upload_events()
            if self.wandb is not None:
                self.wandb.finish()


def write_workdir(workdir: epath.Path, config: ml_collections.ConfigDict, run: "_Run",
                  changed: bool) -> None:
    """config.json (the previous one kept as config.<step>.json when `changed`), plan.json and
    model/ (model_config.json + tokenizer, so eval/export can read the run): written once the run
    is validated and restored."""
    workdir_lib.record_config(config, workdir, run.start, changed)
    if jax.process_index() == 0:
        (workdir / "plan.json").write_text(run.plan.to_json())
        model_dir.save_model_dir(workdir / "model", run.cfg, None, run.tokenizer)


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


class Diverged(FloatingPointError):
    """A step's loss or gradient norm was not finite (nothing of it was saved)."""


class _Logger:
    """Fetches a step's metrics (one step late), adds perf/*, writes them, and stops the run on a
    non-finite step (train.on_nonfinite=stop) or on train.max_skipped_steps skips in a row."""

    def __init__(self, writer: MetricsWriter, flops_per_token: float, peak_flops: float,
                 run: "_Run", t: config_lib.TrainConfig, data_seed: int):
        self.writer, self.flops, self.peak = writer, flops_per_token, peak_flops
        self.run, self.t, self.seed, self.every = run, t, data_seed, t.log_every
        self.skipped, self.in_a_row = run.skipped, 0
        self.since = time.perf_counter()

    def __call__(self, step: int, metrics: dict[str, jax.Array], tokens: int,
                 before_save: bool = False) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        finite = math.isfinite(host["loss"]) and math.isfinite(host["norm/grad"])  # as the step
        host["perf/tokens_per_s"] = tokens / max(now - self.since, 1e-9)
        host["perf/mfu"] = host["perf/tokens_per_s"] * self.flops / self.peak
        self.since = now
        skip = self.t.on_nonfinite == "skip"
        if skip:
            self.in_a_row = 0 if finite else self.in_a_row + 1
            self.skipped += not finite
            host["train/skipped_steps"] = float(self.skipped)
        self.writer.write(step, host, log_line=step % self.every == 0 or step == 1 or not finite)
        if before_save:
            self.writer.flush()
        if not finite:
            self._nonfinite(step, host, skip)
        return host

    def _nonfinite(self, step: int, host: dict[str, float], skip: bool) -> None:
        values = ", ".join(f"{k}={host[k]}" for k in ("loss", "norm/grad", "loss/mle", "loss/rto")
                           if k in host)
        examples = loader_lib.step_examples(self.run.plan.examples, self.run.plan.batch_size,
                                            self.seed, step - 1)[0]
        batch = (f"its batch holds examples {', '.join(map(str, examples))} (indices into the "
                 f"run's {self.run.plan.examples} examples, data.seed={self.seed})")
        saved = self.run.mngr.latest_step()
        last = f"the last checkpoint is step {saved}" if saved is not None else "nothing was saved"
        if not skip:
            raise Diverged(f"step {step} is not finite ({values}); nothing of it was saved and "
                           f"{last}; {batch}. Lower optimizer.learning_rate, check those examples, "
                           "or rerun with --config.train.on_nonfinite=skip")
        if self.in_a_row >= self.t.max_skipped_steps:
            raise Diverged(f"{self.in_a_row} steps in a row were not finite (steps "
                           f"{step - self.in_a_row + 1}..{step}, train.max_skipped_steps="
                           f"{self.t.max_skipped_steps}): the run diverged; {last}. Step {step}: "
                           f"{values}; {batch}")
        log.warning("step %d skipped (%s): its update was not applied; %s", step, values, batch)


@dataclasses.dataclass
class _Run:
    """Everything the step loop needs, restored from the last checkpoint when there is one."""

    cfg: ModelConfig
    steps: int
    start: int
    skipped: int  # steps skipped as non-finite before `start`
    state: step_lib.State
    loader: Any
    mngr: Any
    train_step: Any
    mesh: Any
    plan: loader_lib.Plan
    tokenizer: Any


def _prepare(run_cfg: config_lib.RunConfig, workdir: epath.Path) -> _Run | None:
    """The run restored (or initialised); None when its checkpoints already reach the plan's
    last step (decided from the folder, before anything is restored)."""
    mesh = shd.make_mesh(run_cfg.mesh)
    cfg, tokenizer = model_and_tokenizer(run_cfg)
    examples = load_examples(run_cfg.data, tokenizer)
    plan = make_plan(run_cfg, examples, mesh)
    log_plan(plan)
    t, c = run_cfg.train, run_cfg.checkpoint
    at = c.restore_step if c.restore_step > 0 else ckpt.newest_step(workdir)
    if at is not None and at >= plan.total_steps:
        total = f"train.steps={plan.total_steps}" if t.steps > 0 else \
            f"{plan.total_steps} steps (train.epochs={t.epochs})"
        log.info("already at step %d >= %s: nothing to do", at, total)
        return None
    setup = step_lib.build(step_config(run_cfg, cfg), mesh, plan.total_steps)
    rng = jax.random.PRNGKey(t.seed)
    fresh = {}  # the initial state, when computing the reference needed it
    if step_lib.needs_stored_reference(setup.cfg):
        def compute():
            fresh["state"] = setup.init(rng, load_params(run_cfg, cfg, setup.shardings["params"]))
            return reference.compute(examples, fresh["state"]["params"], cfg, mesh, plan.seq_len,
                                     plan.rows_per_step, run_cfg.loss.chunk_size)
        examples = reference.attach(examples, reference.load_or_compute(
            workdir, examples, compute, has_progress=at is not None))
    loader = loader_lib.make_loader(examples, plan, run_cfg.data.seed)
    mngr = ckpt.make_manager(workdir, c.keep, c.async_save)
    try:
        restored = ckpt.restore_newest(mngr, setup.shardings, setup.abstract, loader,
                                       c.restore_step if c.restore_step > 0 else None)
    except BaseException:
        mngr.close()
        raise
    if restored is None:
        state = fresh["state"] if "state" in fresh else setup.init(
            rng, load_params(run_cfg, cfg, setup.shardings["params"]))
        start = 0
    else:
        start, state = restored
        log.info("resuming from %s/%d", mngr.directory, start)
    skipped = start - int(jax.device_get(state["step"]))
    return _Run(cfg, plan.total_steps, start, skipped, state, loader, mngr, setup.train_step, mesh,
                plan, tokenizer)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Runs (or resumes) training; returns the last step's metrics ({} when the run had already
    finished). With `train.stop_at` it saves and returns after that step, as a preempted run
    would."""
    run_cfg = config_lib.parse(config)
    workdir = storage.path(workdir)  # a local path or a bucket URL
    with workdir_lib.hold_lock(workdir):
        return _train(run_cfg, config, workdir)


def _train(run_cfg: config_lib.RunConfig, config: ml_collections.ConfigDict,
           workdir: epath.Path) -> dict[str, float]:
    ckpt.remove_unfinished(workdir)
    folder = workdir / ckpt.CHECKPOINT_DIR
    progress = folder.is_dir() and any(folder.iterdir())
    t = run_cfg.train
    changed = workdir_lib.check_config(config, workdir, t.allow_config_change) if progress else {}
    run = _prepare(run_cfg, workdir)
    if run is None:
        return {}
    writer = preemption = None
    try:
        write_workdir(workdir, config, run, changed=bool(changed))
        writer = MetricsWriter(workdir, run.start, run.steps, config)
        preemption = _Preemption()
        metrics = _loop(run, run_cfg.checkpoint.every_steps, t.stop_at,
                        _make_logger(run, run_cfg, writer), preemption)
        ckpt.wait(run.mngr)
    except BaseException:
        with contextlib.suppress(Exception):  # a save in flight completes, whatever stopped us
            run.mngr.wait_until_finished()
        with contextlib.suppress(Exception):
            run.mngr.close()
        raise
    else:
        run.mngr.close()
        return metrics
    finally:
        if writer is not None:
            writer.close()
        if preemption is not None:
            preemption.restore()


def _make_logger(run: _Run, run_cfg: config_lib.RunConfig, writer: MetricsWriter) -> _Logger:
    t = run_cfg.train
    per_device = t.peak_tflops * 1e12 if t.peak_tflops > 0 else perf.measure_matmul_flops(
        dtype=run.cfg.dtype)
    log.info("perf/mfu against %.1f TFLOP/s per device (%s)", per_device / 1e12,
             "train.peak_tflops" if t.peak_tflops > 0 else f"measured {run.cfg.dtype} matmul")
    return _Logger(writer, perf.train_flops_per_token(run.cfg, run_cfg.data.max_length),
                   per_device * jax.device_count(), run, t, run_cfg.data.seed)


def _loop(run: _Run, every: int, stop_at: int, logger: _Logger,
          preemption: _Preemption) -> dict[str, float]:
    """The steps; metrics of step t are fetched after step t+1 is launched, or before step t is
    saved (so its row is on disk first, and a non-finite step stops the run unsaved)."""
    base_rng = jax.device_get(run.state["rng"])
    state, step, pending, last = run.state, run.start, None, {}
    while step < run.steps:
        batch = next(run.loader)
        tokens = int(np.count_nonzero(batch["segment_ids"]))
        state, metrics = run.train_step(state, shd.shard_batch(shd.local_rows(batch), run.mesh),
                                        jax.random.fold_in(base_rng, step))
        step += 1
        if pending is not None:
            last = logger(*pending)
        pending = (step, metrics, tokens)
        stop = step == stop_at or preemption.requested_anywhere()
        if step % every == 0 or step == run.steps or stop:
            last, pending = logger(*pending, before_save=True), None
            ckpt.save(run.mngr, step, state, run.loader)
        if stop:
            break
    if pending is not None:
        last = logger(*pending)
    return last
