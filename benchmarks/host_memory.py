"""Peak host memory per process when 4 processes x 2 devices load a wide model with fsdp 8.

    python -m benchmarks.host_memory [--hidden 2048 --intermediate 5632 --layers 4]
        [--processes 4 --devices 2]

Writes a random LLaMA-3-vocabulary model dir (2.7 GB in float32 with the defaults, one tensor at
a time), then for each loader starts `--processes` processes on 127.0.0.1 (`jax.distributed`,
`--devices` CPU devices each, mesh 1 x 8 x 1) that load it the way the product does:

    train   training/loop.py load_params for a scan_layers run (each stacked tensor's shards
            filled layer by layer, `Checkpoint.stacked_on_devices`), then the optimizer state
            (`setup.init`), as a training start does
    eval    evaluation/loading.py load_eval_model (eval, generate: `Checkpoint.on_devices`),
            weights then tokenizer
    workdir the train loader again, from the training checkpoint (weights and Adam moments,
            saved sharded by the train processes through training/checkpointing.py), as the
            DPO baseline starts from a vanilla run

Each process reports its peak RSS (VmHWM) above its RSS after the imports and the distributed
start-up (the baseline): once the weights are placed, against the bytes of the weights' shards
its own devices hold, and at the end, against all it then holds (train: weights and optimizer
state; eval: the weights, the tokenizer's memory counted as overhead). On CPU devices the shards
themselves are host memory. A loader that gathered the model on a host would show about
`processes` times its share.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama3-tokenizer"


LOADERS = ("train", "eval", "workdir")


def rss_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def architecture(args: argparse.Namespace) -> dict:
    return {"hidden_size": args.hidden, "intermediate_size": args.intermediate,
            "num_layers": args.layers, "num_heads": args.hidden // 128,
            "num_kv_heads": max(1, args.hidden // 512), "head_dim": 128}


def make_model(args: argparse.Namespace, out: pathlib.Path) -> None:
    """A random model dir, written one tensor at a time (names.LazyTensor)."""
    import numpy as np
    from derta_jax.checkpoints import model_dir, names
    from derta_jax.models.config import preset

    cfg = preset("llama3-8b").replace(**architecture(args))
    rng = np.random.default_rng(0)
    params: dict = {}
    for path, shape in names.canonical_shapes(cfg).items():
        leaf = names.LazyTensor(shape, np.dtype(np.float32), lambda shape=shape: (
            0.02 * rng.standard_normal(shape, dtype=np.float32)))
        names.set_leaf(params, path, leaf)
    model_dir.save_model_dir(out, cfg, params, model_dir.load_tokenizer(TOKENIZER))


def worker(args: argparse.Namespace) -> None:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.processes,
                               process_id=args.process_id)
    from derta_jax.checkpoints import model_dir, resolve
    from derta_jax.evaluation import loading
    from derta_jax.training import config as config_lib
    from derta_jax.training import loop
    from derta_jax.training import step as step_lib
    from derta_jax.training import sharding as shd
    from configs import tiny

    def mb(tree) -> float:  # of the shards this process's devices hold
        return sum(s.data.nbytes for x in jax.tree.leaves(tree)
                   for s in x.addressable_shards) / 2**20

    config = tiny.get_config()
    config.model.init, config.model.checkpoint = "checkpoint", args.model
    config.model.scan_layers = True
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    run = config_lib.parse(config)
    cfg = run.model_config(resolve.resolve_checkpoint(args.model).cfg)
    mesh = shd.make_mesh(run.mesh)
    baseline = rss_kib("VmRSS")
    if args.worker in ("train", "workdir"):
        setup = step_lib.build(step_lib.StepConfig(cfg, run.loss, run.optimizer), mesh, 10)
        params = jax.block_until_ready(loop.load_params(run, cfg, setup.shardings["params"]))
        weights_peak, weights = rss_kib("VmHWM"), mb(params)
        model = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
        loaded = setup.init(jax.random.PRNGKey(0), params)  # + the optimizer state, as a start
    else:
        real_tokenizer, peaks = loading.load_tokenizer, []

        def tokenizer_after_the_weights(path):
            peaks.append(rss_kib("VmHWM"))
            return real_tokenizer(path)

        loading.load_tokenizer = tokenizer_after_the_weights
        loaded = loading.load_eval_model(args.model, mesh=mesh).params
        (weights_peak,), weights = peaks, mb(loaded)
        model = sum(x.nbytes for x in jax.tree.leaves(loaded)) / 2**20
    jax.block_until_ready(loaded)
    print(json.dumps({"process": args.process_id, "loader": args.worker, "model_mb": model,
                      "weights_mb": weights, "weights_peak_mb": (weights_peak - baseline) / 1024,
                      "share_mb": mb(loaded), "peak_mb": (rss_kib("VmHWM") - baseline) / 1024}),
          flush=True)
    if args.save_to:  # the state as a training run saves it: what the `workdir` loader reads
        import grain
        from derta_jax.training import checkpointing
        if jax.process_index() == 0:
            model_dir.save_model_dir(args.save_to / "model", cfg, None, None)
        mngr = checkpointing.make_manager(args.save_to, keep=1, async_save=False)
        checkpointing.save(mngr, 1, loaded, iter(grain.MapDataset.range(2).to_iter_dataset()))
        checkpointing.wait(mngr)
        mngr.close()
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, loader: str, model: pathlib.Path,
           save_to: pathlib.Path | None = None) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.host_memory", "--worker", loader, "--model",
         str(model), "--coordinator", f"127.0.0.1:{port}", "--processes", str(args.processes),
         "--process-id", str(i), *(["--save-to", str(save_to)] if save_to else [])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(args.processes)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"{loader} process failed:\n{err[-3000:]}")
        rows.append(json.loads(next(line for line in out.splitlines()
                                    if line.startswith('{"process"'))))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    p.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    p.add_argument("--save-to", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--make", type=pathlib.Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        return make_model(args, args.make)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp) / "model"
        # In a child: this parent stays small, as its RSS would carry into the workers'.
        subprocess.run([sys.executable, "-m", "benchmarks.host_memory", "--make", str(model),
                        "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                        "--layers", str(args.layers)],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
                       check=True)
        on_disk = sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 2**20
        print(f"model dir: {on_disk:.0f} MB on disk; {args.processes} processes x "
              f"{args.devices} devices, mesh 1 x {args.processes * args.devices} x 1")
        workdir = pathlib.Path(tmp) / "workdir"
        for loader in LOADERS:
            rows = launch(args, loader, workdir if loader == "workdir" else model,
                          workdir if loader == "train" else None)
            for row in rows:
                print(f"{loader:7s} process {row['process']}: its weights {row['weights_mb']:.0f} "
                      f"MB of {row['model_mb']:.0f} MB, peak {row['weights_peak_mb']:.0f} MB "
                      f"({row['weights_peak_mb'] / row['weights_mb']:.2f}x); then "
                      + (f"the optimizer state: its shards {row['share_mb']:.0f} MB in all"
                         if loader != "eval" else "the tokenizer")
                      + f", peak {row['peak_mb']:.0f} MB ({row['peak_mb'] / row['share_mb']:.2f}x)")

if __name__ == "__main__":
    main()
