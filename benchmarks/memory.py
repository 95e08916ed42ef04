"""Peak memory of the train step with vs without chunked cross-entropy and remat.

    python -m benchmarks.memory [--batch 4] [--seq 512]

The figure is XLA's own buffer plan for the compiled step (arguments + outputs + temporaries from
`compiled.memory_analysis()`), for SmolLM2-135M's shape (vocab 49152, layers scanned): the step of
`step.build`, lowered on the abstract state (nothing is allocated or run). "Unchunked" sets the
loss chunk to the whole sequence, which materialises float32 logits for the whole batch.
"""
import argparse
import json

import jax

from benchmarks import common
from derta_jax.models.config import preset
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib


def peak_mib(batch: int, seq: int, chunk: int, remat: str) -> dict:
    cfg = preset("smollm2-135m", remat=remat, scan_layers=True)  # scan: one layer to compile
    setup = step_lib.build(step_lib.StepConfig(
        cfg, step_lib.LossConfig(chunk_size=chunk), step_lib.OptimizerConfig(learning_rate=1e-5)),
        shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1]), total_steps=100)
    data = common.synthetic_batch(batch, seq, cfg.vocab_size)
    step = jax.jit(setup.train_step, donate_argnums=0)  # the state is donated, as in training
    m = step.lower(setup.abstract, data, jax.random.PRNGKey(0)).compile().memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return {"loss_chunk": chunk, "remat": remat, "temp_mib": round(m.temp_size_in_bytes / 2**20),
            "peak_mib": round(total / 2**20)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    args = p.parse_args()
    rows = [peak_mib(args.batch, args.seq, chunk, remat)
            for chunk, remat in [(args.seq, "none"), (128, "none"), (args.seq, "full"), (128, "full")]]
    logits_mib = args.batch * args.seq * 49152 * 4 / 2**20
    print(json.dumps({"batch": args.batch, "seq": args.seq,
                      "full_float32_logits_mib": round(logits_mib), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
