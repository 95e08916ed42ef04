"""Train-step throughput and MFU on SmolLM2-135M's shape at sequence 512, on this machine.

    python -m benchmarks.train_step [--batch 4] [--seq 512] [--steps 3]

The peak is a float32 matmul measured in the same run (derta_jax.training.perf), so MFU is a
ratio of two numbers from one machine. Random weights: speed does not depend on their values.
The comparison with the official PyTorch step, in one script, is benchmarks/official_recipe.py.
"""
import argparse
import json
import time

import jax
import numpy as np

from derta_jax.models.config import preset
from derta_jax.training import optimizer as opt_lib
from derta_jax.training import perf
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib


def dense_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One full-length example per row; the second half of each is RTO-supervised."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, seq)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq // 4:] = True
    rto = np.zeros((batch, seq), bool)
    rto[:, seq // 2:] = True
    targets = np.roll(tokens, -1, axis=1)
    targets[rto] = 7
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, rto_mask=rto,
                segment_ids=np.ones((batch, seq), np.int32),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy())


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
    tx, schedule = opt_lib.make_optimizer(opt_lib.OptimizerConfig(learning_rate=1e-5), 100)
    _, shardings = step_lib.state_shardings(cfg, tx, mesh)
    state = step_lib.init_state(jax.random.PRNGKey(0), cfg, tx, mesh)
    step = step_lib.make_train_step(
        step_lib.StepConfig(cfg, step_lib.LossConfig(chunk_size=128)), tx, schedule, mesh, shardings)
    batch = shd.shard_batch(dense_batch(args.batch, args.seq, cfg.vocab_size), mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, batch, jax.random.PRNGKey(i + 1))
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / args.steps
    peak = perf.measure_matmul_flops(dtype=args.dtype)
    tokens_per_s = args.batch * args.seq / step_s
    model_flops = tokens_per_s * perf.train_flops_per_token(cfg, args.seq)
    print(json.dumps({
        "model": "smollm2-135m", "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "remat": args.remat, "devices": 1, "first_step_s (compile)": round(compile_s, 1),
        "step_s": round(step_s, 2), "tokens_per_s": round(tokens_per_s, 1),
        "model_gflops_per_s": round(model_flops / 1e9, 1),
        "matmul_peak_gflops_per_s": round(peak / 1e9, 1), "mfu": round(model_flops / peak, 3)},
        indent=1))


if __name__ == "__main__":
    main()
