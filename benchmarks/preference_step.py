"""Tokens/s of a preference step (DPO, ...) against a DeRTa step on the same rows (issue 15).

    python -m benchmarks.preference_step [--rows 4] [--seq 256] [--rounds 5] [--devices 1]
        [--cases derta,dpo,derta_lora,dpo_lora,simpo,constrained_sft] [--layers 4] [--hidden 256]

One model (a small LLaMA-shaped config, float32), one mesh, one batch: packed rows of
{prompt, chosen, rejected} pairs built by the data pipeline's own code (`tokenize.materialize`,
`packing.first_fit_decreasing` / `fill_rows`: pair j of a row is segments 2j + 1 and 2j + 2, prompt
tokens carry no loss, rto_mask is all False). The DeRTa step reads those rows as ordinary MLE
segments, the preference steps as pairs. Full-parameter DPO / constrained SFT read the stored
reference `batch["ref_logps"]` (random float32 here: speed does not depend on the values); in the
*_lora cases (rank `--lora-rank`) the reference is the step's second forward of the frozen base,
adapters zeroed.

Each case's jitted `step.build` step runs twice untimed (the first call compiles); then `--rounds`
rounds time every case in turn (the order rotated each round), `--steps` steps each, so that load
from other work on the machine falls on all cases alike. Reported: the median ms/step, tokens/s
(non-padding token slots per second) and the step time relative to the DeRTa case with the same
parameters (full or LoRA), plus XLA's FLOP count of each step's HLO before optimisation (cost
analysis) where the backend gives one. Compare ratios from one run, never absolute figures across
runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

CASES = {  # name: (objective, LoRA)
    "derta": ("derta", False), "dpo": ("dpo", False),
    "derta_lora": ("derta", True), "dpo_lora": ("dpo", True),
    "simpo": ("simpo", False), "constrained_sft": ("constrained_sft", False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4, help="packed rows per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds over all cases")
    p.add_argument("--steps", type=int, default=1, help="timed steps per case per round")
    p.add_argument("--devices", type=int, default=1,
                   help="CPU devices on the data axis (XLA_FLAGS host device count)")
    p.add_argument("--cases", default="derta,dpo,derta_lora,dpo_lora,simpo,constrained_sft",
                   help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--chunk", type=int, default=128, help="loss.chunk_size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.rows % args.devices:
        p.error(f"--rows {args.rows} is not divisible by --devices {args.devices}")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices > 1:  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={ARGS.devices}").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from derta_jax.data import packing  # noqa: E402
from derta_jax.data.tokenize import TokenizedExample, materialize  # noqa: E402
from derta_jax.models.config import ModelConfig  # noqa: E402
from derta_jax.training import sharding as shd  # noqa: E402
from derta_jax.training import step as step_lib  # noqa: E402


def model_config(args: argparse.Namespace, lora: bool) -> ModelConfig:
    """LLaMA-shaped: head_dim 64, 2 query heads per KV head, SwiGLU at 3x hidden, untied head."""
    heads = max(2, args.hidden // 64)
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=3 * args.hidden, num_layers=args.layers,
                       num_heads=heads, num_kv_heads=heads // 2, head_dim=64,
                       max_position_embeddings=max(1024, args.seq), rope_theta=10000.0,
                       bos_token_id=1, eos_token_ids=(2,), dtype="float32",
                       lora_rank=args.lora_rank if lora else 0,
                       lora_alpha=2.0 * args.lora_rank)


def pair_rows(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """[rows, seq] packed rows of random-id pairs (prompt seq/32-seq/8 tokens, each response
    seq/16-seq/4), the fullest `rows` rows of a first-fit-decreasing packing, plus random
    `ref_logps`."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(rows * seq // 64):  # far more pairs than fit: keep the fullest rows
        prompt = list(rng.integers(3, vocab, rng.integers(seq // 32, seq // 8 + 1)))
        chosen, rejected = (np.asarray(prompt + list(rng.integers(
            3, vocab, rng.integers(seq // 16, seq // 4 + 1))), np.int32) for _ in range(2))
        examples.append(TokenizedExample(chosen, len(prompt), rejected=rejected))
    arrays = [materialize(e, seq) for e in examples]
    bins = packing.first_fit_decreasing([len(a["tokens"]) for a in arrays], seq)[:rows]
    batch = packing.fill_rows(arrays, bins, rows, seq)
    batch["ref_logps"] = rng.normal(-4.0, 1.0, (rows, seq)).astype(np.float32)
    return batch


class Case:
    def __init__(self, name: str, args: argparse.Namespace, mesh, batch: dict[str, np.ndarray],
                 host_states: dict[bool, dict]):
        objective, lora = CASES[name]
        self.name, self.lora = name, lora
        cfg = step_lib.StepConfig(model_config(args, lora),
                                  step_lib.LossConfig(objective=objective, chunk_size=args.chunk),
                                  step_lib.OptimizerConfig(learning_rate=1e-5))
        self.setup = step_lib.build(cfg, mesh, total_steps=1000)
        self.batch = shd.shard_batch({k: batch[k] for k in step_lib.batch_keys(cfg)}, mesh)
        # The same initial state for every case of one model (full or LoRA): created once, on
        # the host, and put on the mesh per case (each case's step donates its own copy).
        if lora not in host_states:
            host_states[lora] = jax.device_get(self.setup.init(jax.random.PRNGKey(args.seed)))
        self.state = jax.device_put(host_states[lora], self.setup.shardings)
        self.i = 0
        self.times: list[float] = []
        self.gflops = self._xla_gflops()

    def _xla_gflops(self) -> float | None:
        try:
            with self.setup.mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
                lowered = self.setup.step_fn.lower(
                    self.state, {k: self.batch[k] for k in step_lib.batch_keys(self.setup.cfg)},
                    jax.random.PRNGKey(0))
            cost = lowered.cost_analysis()  # of the HLO before optimisation: no compile
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return float(cost["flops"]) / 1e9
        except Exception:  # noqa: BLE001 - an estimate only; not every backend gives one
            return None

    def step(self) -> dict:
        self.state, metrics = self.setup.train_step(self.state, self.batch,
                                                    jax.random.PRNGKey(self.i))
        self.i += 1
        return jax.block_until_ready(metrics)


def main(args: argparse.Namespace) -> None:
    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"error: {args.devices} devices asked, {len(devices)} found")
    mesh = shd.make_mesh(shd.MeshConfig(data=-1), devices)
    batch = pair_rows(args.rows, args.seq, args.vocab, args.seed)
    tokens = int((batch["segment_ids"] != 0).sum())
    supervised = int(batch["loss_mask"].sum())
    pairs = int(batch["segment_ids"].max(axis=1).sum()) // 2
    names = args.cases.split(",")
    cfg = model_config(args, False)
    print(f"machine: {common.machine()}; jax {jax.__version__}, {len(devices)} device(s)")
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads x 64, vocab {cfg.vocab_size}, float32; "
          f"LoRA rank {args.lora_rank} on {len(cfg.lora_targets)} projections")
    share = tokens / batch["segment_ids"].size
    print(f"batch: {args.rows} x {args.seq} slots, {tokens} tokens ({share:.0%}), {pairs} pairs, "
          f"{supervised} supervised")
    cases, compile_s, host_states = [], {}, {}
    start = time.perf_counter()
    for name in names:
        case = Case(name, args, mesh, batch, host_states)
        t0 = time.perf_counter()
        out = case.step()  # compiles
        compile_s[name] = time.perf_counter() - t0
        case.step()  # warm-up
        if not np.isfinite(float(out["loss"])):
            raise SystemExit(f"error: {name}: non-finite loss {out['loss']}")
        cases.append(case)
    timed_from = time.perf_counter()
    for r in range(args.rounds):
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                case.step()
                case.times.append(time.perf_counter() - t0)
    print(f"setup, compile and warm-up {timed_from - start:.0f} s, timed rounds "
          f"{time.perf_counter() - timed_from:.0f} s")
    median = {c.name: statistics.median(c.times) for c in cases}
    print(f"\n{args.rounds} rounds x {args.steps} step(s) per case, median; ratio: step time / "
          "the DeRTa step's with the same parameters (full or LoRA)\n")
    print("| case | reference | ms/step | tokens/s | x derta time | XLA GFLOP | x derta GFLOP "
          "| compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    by_name = {c.name: c for c in cases}
    for c in cases:
        base = "derta_lora" if c.lora else "derta"
        objective = CASES[c.name][0]
        ref = ("none" if objective in ("derta", "simpo") else
               "live (frozen-base forward)" if c.lora else "stored ref_logps")
        ratio = (f"{median[c.name] / median[base]:.2f}" if base in median else "-")
        fl = f"{c.gflops:.1f}" if c.gflops else "-"
        fl_ratio = (f"{c.gflops / by_name[base].gflops:.2f}" if c.gflops and base in by_name
                    and by_name[base].gflops else "-")
        print(f"| {c.name} | {ref} | {1e3 * median[c.name]:.0f} | "
              f"{tokens / median[c.name]:.0f} | {ratio} | {fl} | {fl_ratio} | "
              f"{compile_s[c.name]:.1f} |")
    spread = {c.name: (min(c.times), max(c.times)) for c in cases}
    print("\nper-case min-max ms: " + ", ".join(
        f"{n} {1e3 * lo:.0f}-{1e3 * hi:.0f}" for n, (lo, hi) in spread.items()))


if __name__ == "__main__":
    main(ARGS)
