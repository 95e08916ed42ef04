"""Single-accelerator figures: bf16 matmul peak, train-step MFU of a 1B-class LLaMA, generation.

    benchmarks/gpu.sh [--batch 8] [--remat none]       # on one GPU (see gpu.sh)
    python -m benchmarks.gpu_bench --tiny               # small shapes: runs anywhere, even CPU

1. Peak: an n x n bf16 `jnp.dot` (n = 8192) timed after warm-up; the attainable bf16 matmul
   FLOP/s of this device, the denominator of MFU.
2. Train step: our jitted DeRTa train step (bf16 compute, float32 master weights and AdamW state)
   on a LLaMA-3-style 1B config (hidden 2048, 16 layers, 32 heads, 8 kv heads, vocab 128256,
   seq 2048), random weights, one row = one example, half the rows RTO. MFU = model FLOPs per
   token (6 N + 12 L H Dh S, PaLM appendix B) x tokens/s / peak.
3. Generation: `derta_jax.evaluation.generation.generate`, greedy, batch 16, 128-token prompts,
   256 new tokens with no stop id; tokens/s = batch x new tokens / time, after a warm-up call.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from derta_jax.evaluation.generation import generate
from derta_jax.models.config import ModelConfig
from derta_jax.training import perf, sharding as shd, step as step_lib


@dataclasses.dataclass(frozen=True)
class Shapes:
    model: ModelConfig
    batch: int
    seq: int
    matmul: int
    gen_batch: int
    prompt: int
    new_tokens: int


LLAMA_1B = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                       num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                       max_position_embeddings=8192, dtype="bfloat16")
SHAPES = {
    "1b": Shapes(LLAMA_1B, batch=8, seq=2048, matmul=8192, gen_batch=16, prompt=128,
                 new_tokens=256),
    "tiny": Shapes(LLAMA_1B.replace(vocab_size=512, hidden_size=64, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
                   batch=2, seq=64, matmul=256, gen_batch=2, prompt=8, new_tokens=8),
}


def matmul_peak(n: int, repeats: int = 10) -> float:
    """bf16 n x n x n matmul FLOP/s on the first device."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    return 2.0 * n ** 3 / common.timed(lambda: dot(a, b).block_until_ready(), repeats)[0]


def train_throughput(cfg: ModelConfig, batch: int, seq: int, steps: int) -> tuple[dict, dict]:
    """(figures, trained params) of our jitted train step on one device."""
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    setup = step_lib.build(step_lib.StepConfig(cfg, optimizer=step_lib.OptimizerConfig(
        learning_rate=1e-5, schedule="constant", warmup_ratio=0.0)), mesh, total_steps=10 ** 6)
    data = shd.shard_batch(common.synthetic_batch(batch, seq, cfg.vocab_size), mesh)
    box = {"state": setup.init(jax.random.PRNGKey(0))}

    def step():
        box["state"], metrics = setup.train_step(box["state"], data, jax.random.PRNGKey(0))
        jax.block_until_ready(metrics["loss"])

    compile_s, _ = common.timed(step, warmup=False)
    seconds, _ = common.timed(step, steps)
    tokens_per_s = batch * seq / seconds
    return ({"step_s": seconds, "tokens_per_s": tokens_per_s, "compile_s": compile_s,
             "model_flops_per_s": tokens_per_s * perf.train_flops_per_token(cfg, seq)},
            box["state"]["params"])


def generation_throughput(cfg: ModelConfig, params, batch: int, prompt: int,
                          new_tokens: int) -> dict:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, prompt).tolist() for _ in range(batch)]

    def run():
        generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=(), batch_size=batch,
                 progress=False)

    seconds, _ = common.timed(run)
    return {"gen_s": seconds, "gen_tokens_per_s": batch * new_tokens / seconds}


def run(shapes: Shapes, steps: int) -> dict:
    peak = matmul_peak(shapes.matmul)
    train, params = train_throughput(shapes.model, shapes.batch, shapes.seq, steps)
    gen = generation_throughput(shapes.model, params, shapes.gen_batch, shapes.prompt,
                                shapes.new_tokens)
    return {"device": jax.devices()[0].device_kind, "matmul_n": shapes.matmul,
            "bf16_peak_tflops": peak / 1e12, **train, "mfu": train["model_flops_per_s"] / peak,
            **gen, "batch": shapes.batch, "seq": shapes.seq, "remat": shapes.model.remat,
            "gen_batch": shapes.gen_batch, "prompt": shapes.prompt, "new_tokens": shapes.new_tokens}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--batch", type=int, default=None, help="train rows (default 8; tiny 2)")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    p.add_argument("--steps", type=int, default=5, help="timed train steps after the warm-up")
    p.add_argument("--out", default="", help="also write the figures as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    shapes = SHAPES["tiny" if args.tiny else "1b"]
    shapes = dataclasses.replace(shapes, batch=args.batch or shapes.batch,
                                 model=shapes.model.replace(remat=args.remat))
    figures = run(shapes, args.steps)
    print(f"device {figures['device']}: bf16 matmul peak {figures['bf16_peak_tflops']:.1f} TFLOP/s "
          f"(n={figures['matmul_n']})")
    print(f"train step {shapes.batch} x {shapes.seq}, remat {args.remat}: {figures['step_s']:.3f} s, "
          f"{figures['tokens_per_s']:.0f} tokens/s, MFU {100 * figures['mfu']:.1f}% "
          f"(compile {figures['compile_s']:.0f} s)")
    print(f"generation batch {shapes.gen_batch}, prompt {shapes.prompt}, {shapes.new_tokens} new "
          f"tokens: {figures['gen_tokens_per_s']:.0f} tokens/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
