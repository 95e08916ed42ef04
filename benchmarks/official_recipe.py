"""Our DeRTa training step measured against the official one (PyTorch), on SmolLM2 and demo data.

    python -m benchmarks.official_recipe [--examples 64] [--batch 16] [--seq-len 512] [--steps 3]
        [--gen-batch 16] [--gen-tokens 256] [--threads 2]

The official step is the PyTorch reimplementation in tests/reference/official_recipe_torch.py
(independent of derta_jax, and what tests/reference/test_official_recipe.py checks our loss,
gradients and AdamW step against). Both sides take the same `--batch` demo examples in every step
(the steps of our loader's plan): the official step padded to the longest of them, ours (the
jitted step of `training/step.py`, via `step.build`) packed into rows of `--seq-len` by
`data/loader.py`. The script checks that both tokenise the examples identically and compute the
same loss on the first batch, then reports each library's float32 matmul peak, supervised tokens
per second of each step and greedy generation throughput (ours vs transformers `generate`).
float32 on both sides. Results go in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
from typing import Any, Sequence

import jax
import numpy as np
import torch
import transformers

from benchmarks import common
from derta_jax.data import loader, packing, pipeline
from derta_jax.data.recipe import DertaRecord
from derta_jax.data.tokenize import build_examples, materialize
from derta_jax.training import perf, sharding as shd, step as step_lib
from tests.reference import official_recipe_torch as official


def _demo_records(tokenizer: Any, n: int) -> list[dict[str, str]]:
    """`n` records of a shuffled demo `derta` mixture (all helpful pairs, 100 RTO, 100 harmful
    prefix), in the official file format."""
    recs = pipeline.mixture_records("derta", pipeline.DEMO_SAFETY, pipeline.DEMO_HELPFUL, tokenizer,
                                    rto_count=100, prefix_count=100)
    order = np.random.default_rng(0).permutation(len(recs))[:n]
    return [recs[i].to_json() for i in order]


def _ours_examples(records, tokenizer, seq_len: int, refusal_id: int):
    recs = [DertaRecord(r["prefix"], r["text"], r["safe"] == "true") for r in records]
    examples, stats = build_examples(recs, tokenizer, seq_len, refusal_id, "base")
    if stats.dropped_no_supervised:
        raise ValueError(f"{stats.dropped_no_supervised} examples have no supervised token")
    return examples


def bench_official(model, official_examples, plan: loader.Plan, refusal_id: int, pad_id: int,
                   steps: int) -> dict[str, float]:
    """The official step on the examples of our plan's steps 1..steps (the same examples per step
    as ours), each batch padded to its longest, after one untimed warm-up step (step 0)."""
    batches = [official.collate([official_examples[i] for i in
                                 loader.step_examples(plan.examples, plan.batch_size, 0, s)[0]],
                                pad_id) for s in range(steps + 1)]
    opt = official.official_optimizer(model, lr=1e-5, weight_decay=0.0)
    official.train_step(model, opt, batches[0], refusal_id)
    it = iter(batches[1:])

    def step():
        official.train_step(model, opt, next(it), refusal_id)

    seconds, _ = common.timed(step, steps, warmup=False)
    sup = np.mean([official.supervised_tokens(b) for b in batches[1:]])
    slots = np.mean([b["input_ids"].numel() for b in batches[1:]])
    return {"s_per_step": seconds, "sup_per_step": sup, "slots_per_step": slots}


def bench_ours(setup: step_lib.Setup, state, examples, plan: loader.Plan, steps: int
               ) -> dict[str, float]:
    """Our step on the plan's steps 1..steps (`plan.batch_size` examples packed into
    `plan.rows_per_step` rows), after step 0, which compiles."""
    batches = list(loader.make_loader(examples, plan, seed=0))
    box = {"state": state, "i": 0}

    def step():
        b = batches[box["i"]]
        box["state"], metrics = setup.train_step(box["state"], shd.shard_batch(b, setup.mesh),
                                                 jax.random.PRNGKey(box["i"]))
        jax.block_until_ready(metrics["loss"])
        box["i"] += 1

    compile_s, _ = common.timed(step, warmup=False)
    seconds, _ = common.timed(step, steps, warmup=False)
    sup = np.mean([b["loss_mask"].sum() for b in batches[1:]])
    return {"s_per_step": seconds, "sup_per_step": sup, "rows": plan.rows_per_step,
            "slots_per_step": plan.rows_per_step * plan.seq_len, "compile_s": compile_s}


def matmul_peaks(n: int = 2048, repeats: int = 10) -> tuple[float, float]:
    """GFLOP/s of an n x n float32 matmul in JAX and in torch (fastest of `repeats`), printed
    beside the ratios: whether a machine is slow or our code is."""
    t = torch.ones((n, n))
    torch_s = min(common.timed(lambda: t @ t)[0] for _ in range(repeats))
    return perf.measure_matmul_flops(n, repeats=repeats) / 1e9, 2 * n ** 3 / torch_s / 1e9


def check_same_loss(setup: step_lib.Setup, state, model, ours_examples, official_examples,
                    seq_len: int, refusal_id: int, pad_id: int) -> tuple[float, float]:
    """Both losses on the official first batch's examples (ours: one example per padded row,
    through the train step's own loss sums)."""
    for o, e in zip(official_examples, ours_examples):
        if o.input_ids != e.tokens.tolist():
            raise ValueError(f"tokenisation differs: official {o.input_ids[:12]}... vs ours "
                             f"{e.tokens.tolist()[:12]}...")
    arrays = [materialize(e, seq_len) for e in ours_examples[:len(official_examples)]]
    batch = packing.pad_batch(arrays, (max(len(a["tokens"]) for a in arrays),))
    grads = jax.jit(functools.partial(step_lib.compute_grads, cfg=setup.cfg))
    with setup.mesh:
        _, sums = grads(state, shd.shard_batch(batch, setup.mesh), jax.random.PRNGKey(0))
    with torch.no_grad():
        ref = float(official.pooled_loss(model, official.collate(official_examples, pad_id),
                                         refusal_id))
    return float(sums["loss"]), ref


def bench_generation(cfg, params, model, prompts: list[list[int]], new_tokens: int
                     ) -> dict[str, float]:
    """Greedy, exactly `new_tokens` per prompt (no stop ids), one batch of len(prompts)."""
    from derta_jax.evaluation.generation import generate

    def ours():
        generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=(),
                 batch_size=len(prompts), progress=False)

    n = len(prompts) * new_tokens
    first, _ = common.timed(ours, warmup=False)
    ours_s, _ = common.timed(ours, warmup=False)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as the official evaluation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    model.eval()
    with torch.no_grad():
        theirs, _ = common.timed(lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0), warmup=False)
    return {"ours_tok_s": n / ours_s, "ours_first_call_s": first, "hf_tok_s": n / theirs}


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.official_recipe",
                                description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=64, help="demo records used by both sides")
    p.add_argument("--batch", type=int, default=16, help="examples per step, both sides")
    p.add_argument("--seq-len", type=int, default=512, help="block size; our packed row length")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side, after one warm-up")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=256, help="0 skips the generation benchmark")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p


@dataclasses.dataclass
class Workload:
    """Both sides' model and examples, from the same demo records (what the benchmarks share)."""

    cfg: Any  # our ModelConfig
    params: Any  # our float32 params (kept for generation; the step's state is a copy)
    tokenizer: Any
    model: transformers.PreTrainedModel  # transformers' SmolLM2, float32
    refusal_id: int
    pad_id: int
    records: list[dict[str, str]]
    official_examples: list  # official.OfficialExample per record
    ours_examples: list  # TokenizedExample per record
    setup: step_lib.Setup
    state: Any


def workload(examples: int, seq_len: int) -> Workload:
    """SmolLM2 on both sides, `examples` demo records tokenised both ways, and our step set up as
    the official run (float32, RTO on every position, constant lr 1e-5) on one device."""
    from derta_jax.checkpoints.gguf import load_gguf
    from derta_jax.data.refusal import refusal_token_id
    gguf = common.smollm2_gguf()
    cfg, params, tokenizer = load_gguf(gguf, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise ValueError("transformers' SmolLM2 lm_head is not tied to the embedding")
    refusal_id = refusal_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = _demo_records(tokenizer, examples)
    official_examples = official.tokenize(records, tokenizer, seq_len, bos_id=None)  # no BOS
    ours_examples = _ours_examples(records, tokenizer, seq_len, refusal_id)
    setup = step_lib.build(step_lib.StepConfig(
        cfg, step_lib.LossConfig(rto_keep=1.0), step_lib.OptimizerConfig(
            learning_rate=1e-5, schedule="constant", warmup_ratio=0.0)),
        shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1]), total_steps=10 ** 6)
    state = setup.init(jax.random.PRNGKey(0), params)  # a copy: `params` stay for generation
    return Workload(cfg, params, tokenizer, model, refusal_id, pad_id, records, official_examples,
                    ours_examples, setup, state)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    w = workload(args.examples, args.seq_len)
    ours_loss, ref_loss = check_same_loss(w.setup, w.state, w.model, w.ours_examples,
                                          w.official_examples[:args.batch], args.seq_len,
                                          w.refusal_id, w.pad_id)
    print(f"first batch loss: ours {ours_loss:.6f}, official {ref_loss:.6f}, "
          f"rel diff {abs(ours_loss - ref_loss) / ref_loss:.2e}")
    jax_peak, torch_peak = matmul_peaks()
    plan = loader.make_plan(w.ours_examples, args.batch, args.seq_len, seed=0, steps=args.steps + 1)
    print("timing the official step ...", flush=True)
    theirs = bench_official(w.model, w.official_examples, plan, w.refusal_id, w.pad_id, args.steps)
    print("timing our step (compile first) ...", flush=True)
    ours = bench_ours(w.setup, w.state, w.ours_examples, plan, args.steps)
    rows = [("step", "batch", "token slots", "supervised", "s/step", "supervised tok/s")]
    for name, r, shape in (("official (PyTorch, padded)", theirs, f"{args.batch} examples"),
                           ("ours (JAX, packed)", ours,
                            f"{args.batch} examples in {ours['rows']} x {args.seq_len}")):
        rows.append((name, shape, f"{r['slots_per_step']:.0f}", f"{r['sup_per_step']:.0f}",
                     f"{r['s_per_step']:.2f}", f"{r['sup_per_step'] / r['s_per_step']:.1f}"))
    ratio = (ours["sup_per_step"] / ours["s_per_step"]) / (theirs["sup_per_step"] / theirs["s_per_step"])
    print(f"\n{common.machine()}, {datetime.date.today()}, torch threads {args.threads}, float32; "
          f"2048^2 matmul: jax {jax_peak:.0f} GFLOP/s, torch {torch_peak:.0f} GFLOP/s\n")
    print(_table(rows))
    print(f"\nsupervised tokens/s, ours / official: {ratio:.2f}x (our compile: {ours['compile_s']:.0f} s)")
    if args.gen_tokens:
        prompts = [w.tokenizer(r["prefix"])["input_ids"] for r in w.records[:args.gen_batch]]
        g = bench_generation(w.cfg, w.params, w.model, prompts, args.gen_tokens)
        print(f"\ngeneration, batch {len(prompts)}, {args.gen_tokens} new tokens, greedy: ours "
              f"{g['ours_tok_s']:.1f} tok/s (first call with compile {g['ours_first_call_s']:.0f} s), "
              f"transformers {g['hf_tok_s']:.1f} tok/s, ratio {g['ours_tok_s'] / g['hf_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
