"""Train-step throughput and MFU on SmolLM2-135M's shape at sequence 512, on this machine.

    python -m benchmarks.train_step [--batch 4] [--seq 512] [--steps 3]

The step is `step.build`'s, on a synthetic batch (`common.synthetic_batch`: one full-length example
per row). The peak is a float32 matmul measured in the same run (derta_jax.training.perf), so MFU
is a ratio of two numbers from one machine. Random weights: speed does not depend on their values.
The comparison with the official PyTorch step, in one script, is benchmarks/official_recipe.py.
"""
import argparse
import json

import jax

from benchmarks import common
from derta_jax.models.config import preset
from derta_jax.training import perf
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none")
    args = p.parse_args()
    cfg = preset("smollm2-135m", dtype=args.dtype, remat=args.remat)
    mesh = shd.make_mesh(shd.MeshConfig(data=-1), jax.devices()[:1])
    setup = step_lib.build(step_lib.StepConfig(
        cfg, step_lib.LossConfig(chunk_size=128), step_lib.OptimizerConfig(learning_rate=1e-5)),
        mesh, total_steps=100)
    batch = shd.shard_batch(common.synthetic_batch(args.batch, args.seq, cfg.vocab_size), mesh)
    box = {"state": setup.init(jax.random.PRNGKey(0)), "i": 0}

    def step():
        box["state"], metrics = setup.train_step(box["state"], batch, jax.random.PRNGKey(box["i"]))
        box["i"] += 1
        return jax.block_until_ready(metrics)

    compile_s, _ = common.timed(step, warmup=False)
    step_s, _ = common.timed(step, args.steps, warmup=False)
    peak = perf.measure_matmul_flops(dtype=args.dtype)
    tokens_per_s = args.batch * args.seq / step_s
    model_flops = tokens_per_s * perf.train_flops_per_token(cfg, args.seq)
    print(json.dumps({
        "model": "smollm2-135m", "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "remat": args.remat, "devices": 1, "machine": common.machine(),
        "first_step_s (compile)": round(compile_s, 1),
        "step_s": round(step_s, 2), "tokens_per_s": round(tokens_per_s, 1),
        "model_gflops_per_s": round(model_flops / 1e9, 1),
        "matmul_peak_gflops_per_s": round(peak / 1e9, 1), "mfu": round(model_flops / peak, 3)},
        indent=1))


if __name__ == "__main__":
    main()
