"""Where the time of one training step goes: ours (jax.profiler) and the official one (torch.profiler).

    python -m benchmarks.profile_step [--examples 64] [--batch 16] [--seq-len 512] [--threads 2]

The workload is benchmarks/official_recipe.py's (SmolLM2, float32, demo examples, the same
examples per step on both sides). Our step is traced once after two untimed steps; every XLA
operation of the trace is attributed to a part of the model through the `op_name` of its HLO
instruction in the compiled step (which module and whether forward or backward). The official
step is profiled once after a warm-up step, by aten operator (self time; those under the
optimizer's step are its update). Each table gives seconds of operator time in the profiled step
(XLA runs operators on 2 threads at once, so the sum can exceed the step's wall time) and the
share of the total. Results go in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile
from typing import Sequence

import jax
import torch

from benchmarks import official_recipe as bench
from derta_jax.data import loader
from derta_jax.training import sharding as shd
from tests.reference import official_recipe_torch as official

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_RUNTIME_EVENTS = re.compile(r"^(\$|Thunk|Slinky|Threadpool|end:|PjRt|Common|Pjit|Allocate|Handle|"
                             r"Parse|Wait|Python)")


def our_part(op_name: str) -> str:
    """The part of our step an XLA operation belongs to, from its HLO `op_name`."""
    if "while/body" not in op_name:  # outside the micro-batch scan: clipping, AdamW, metrics
        return "optimizer update and metrics"
    if "bcd,dv->bcv" in op_name or "chunk" in op_name or "/checkpoint/" in op_name:
        return ("LM head + cross-entropy, recomputed in the backward" if "rematted" in op_name
                else "LM head + cross-entropy")
    if any(p in op_name for p in PROJECTIONS):
        return "layer matmuls (q k v o gate up down)"
    if "/attn/" in op_name:
        return ("attention scores, mask and softmax" if "vmap(" in op_name or "attend" in op_name
                else "RoPE and attention reshapes")
    if "/mlp/" in op_name:
        return "MLP activation (SiLU, product)"
    if "norm" in op_name:
        return "RMSNorm"
    if "embed" in op_name:
        return "embedding"
    return "other (residuals, masks, RTO weights)"


def official_part(op: str) -> str:
    """The part of the official step an aten operator belongs to (operators under
    `Optimizer.step` are the optimizer update, whatever their name)."""
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "matmuls (layers and LM head)"
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention (SDPA kernel)"
    if "log_softmax" in op or "nll_loss" in op or "cross_entropy" in op:
        return "cross-entropy"
    if "silu" in op or op in ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt"):
        return "elementwise (SiLU, norms, RoPE, residuals)"
    if op in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index",
              "aten::embedding_dense_backward", "aten::fill_", "aten::zero_"):
        return "copies, embedding, indexing"
    return "other"


def _table(seconds: dict[str, float]) -> str:
    total = sum(seconds.values())
    rows = [f"| {k} | {v:.2f} | {100 * v / total:.0f}% |"
            for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])]
    return "\n".join(["| part | s | share |", "|---|---|---|", *rows, f"| total | {total:.2f} | |"])


def profile_ours(w: bench.Workload, plan: loader.Plan) -> dict[str, float]:
    """Seconds of XLA operator time per part in one traced step (the plan's step 2)."""
    batches = [shd.shard_batch(b, w.setup.mesh) for b in loader.make_loader(w.ours_examples, plan, 0)]
    state = w.state
    for i in range(2):
        state, m = w.setup.train_step(state, batches[i], jax.random.PRNGKey(i))
        jax.block_until_ready(m["loss"])
    hlo = w.setup.step_fn.lower(state, batches[2], jax.random.PRNGKey(2)).compile().as_text()
    op_names = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M))
    # a while loop or conditional's event spans its body's operators: counting it would count
    # them twice
    containers = set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = [^=]*? (?:while|conditional|call)\(",
                                hlo, re.M))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            state, m = w.setup.train_step(state, batches[2], jax.random.PRNGKey(2))
            jax.block_until_ready(m["loss"])
        trace = next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(trace))["traceEvents"]
    seconds: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if (e.get("ph") == "X" and not _RUNTIME_EVENTS.match(e["name"])
                and e["name"] not in containers):
            seconds[our_part(op_names.get(e["name"], ""))] += e["dur"] / 1e6
    return dict(seconds)


def profile_official(w: bench.Workload, plan: loader.Plan) -> dict[str, float]:
    """Seconds of aten self time per part in one profiled step (the plan's step 2)."""
    batches = [official.collate([w.official_examples[i] for i in
                                 loader.step_examples(plan.examples, plan.batch_size, 0, s)[0]],
                                w.pad_id) for s in (1, 2)]
    opt = official.official_optimizer(w.model, lr=1e-5, weight_decay=0.0)
    official.train_step(w.model, opt, batches[0], w.refusal_id)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        official.train_step(w.model, opt, batches[1], w.refusal_id)
    seconds: dict[str, float] = collections.defaultdict(float)
    for e in prof.events():
        part, parent = official_part(e.name), e.cpu_parent
        while parent is not None:  # anything under the optimizer's step is the update
            if parent.name.startswith("Optimizer.step"):
                part = "optimizer update"
            parent = parent.cpu_parent
        seconds[part] += e.self_cpu_time_total / 1e6
    return dict(seconds)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                                description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="examples per step, both sides")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = bench.workload(args.examples, args.seq_len)
    plan = loader.make_plan(w.ours_examples, args.batch, args.seq_len, seed=0, steps=3)
    print(f"ours: {args.batch} examples in {plan.rows_per_step} x {args.seq_len} packed rows\n")
    print(_table(profile_ours(w, plan)))
    print(f"\nofficial: the same {args.batch} examples, padded to the longest\n")
    print(_table(profile_official(w, plan)))


if __name__ == "__main__":
    main()
