"""Our DeRTa training step measured against the official one (PyTorch), on SmolLM2 and demo data.

    python -m benchmarks.official_recipe [--examples 64] [--batch 16] [--seq-len 512] [--steps 3]
        [--gen-batch 16] [--gen-tokens 256] [--threads 2]

The official step is the PyTorch reimplementation in tests/reference/official_recipe_torch.py
(independent of derta_jax, and what tests/reference/test_official_recipe.py checks our loss,
gradients and AdamW step against). Both sides get the same `--batch` demo examples per step:
the official step padded to the longest of them, ours (the jitted step of `training/step.py`,
via `step.build`) packed into rows of `--seq-len` by `data/loader.py`. The script checks that both
tokenise the examples identically and compute the same loss on the first batch, then reports
supervised tokens per second of each step and greedy generation throughput (ours vs transformers
`generate`). float32 on both sides. Results go in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
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
from derta_jax.training import sharding as shd, step as step_lib
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


def bench_official(model, official_examples, batch_size: int, refusal_id: int, pad_id: int,
                   steps: int) -> dict[str, float]:
    batches = [official.collate(official_examples[i:i + batch_size], pad_id)
               for i in range(0, len(official_examples) - batch_size + 1, batch_size)]
    opt = official.official_optimizer(model, lr=1e-5, weight_decay=0.0)
    it = iter(range(10 ** 9))

    def step():
        official.train_step(model, opt, batches[next(it) % len(batches)], refusal_id)

    seconds, _ = common.timed(step, steps)
    sup = np.mean([official.supervised_tokens(batches[(1 + i) % len(batches)]) for i in range(steps)])
    slots = np.mean([batches[(1 + i) % len(batches)]["input_ids"].numel() for i in range(steps)])
    return {"s_per_step": seconds, "sup_per_step": sup, "slots_per_step": slots}


def bench_ours(setup: step_lib.Setup, state, examples, batch_size: int, seq_len: int,
               steps: int) -> dict[str, float]:
    """Our step on `batch_size` examples per step packed into rows of `seq_len` (the loader's
    plan), after one step that compiles."""
    plan = loader.make_plan(examples, batch_size, seq_len, seed=0, steps=steps + 1)
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
            "slots_per_step": plan.rows_per_step * seq_len, "compile_s": compile_s}


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


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from derta_jax.checkpoints.gguf import load_gguf
    from derta_jax.data.refusal import refusal_token_id
    gguf = common.smollm2_gguf()
    cfg, params, tokenizer = load_gguf(gguf, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise ValueError("transformers' SmolLM2 lm_head is not tied to the embedding")
    refusal_id = refusal_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = _demo_records(tokenizer, args.examples)
    official_examples = official.tokenize(records, tokenizer, args.seq_len, bos_id=None)  # no BOS
    ours_examples = _ours_examples(records, tokenizer, args.seq_len, refusal_id)
    setup = step_lib.build(step_lib.StepConfig(
        cfg, step_lib.LossConfig(rto_keep=1.0), step_lib.OptimizerConfig(
            learning_rate=1e-5, schedule="constant", warmup_ratio=0.0)),
        shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1]), total_steps=10 ** 6)
    state = setup.init(jax.random.PRNGKey(0), params)  # a copy: `params` stay for generation

    ours_loss, ref_loss = check_same_loss(setup, state, model, ours_examples,
                                          official_examples[:args.batch], args.seq_len,
                                          refusal_id, pad_id)
    print(f"first batch loss: ours {ours_loss:.6f}, official {ref_loss:.6f}, "
          f"rel diff {abs(ours_loss - ref_loss) / ref_loss:.2e}")
    print("timing the official step ...", flush=True)
    theirs = bench_official(model, official_examples, args.batch, refusal_id, pad_id, args.steps)
    print("timing our step (compile first) ...", flush=True)
    ours = bench_ours(setup, state, ours_examples, args.batch, args.seq_len, args.steps)
    rows = [("step", "batch", "token slots", "supervised", "s/step", "supervised tok/s")]
    for name, r, shape in (("official (PyTorch, padded)", theirs, f"{args.batch} examples"),
                           ("ours (JAX, packed)", ours,
                            f"{args.batch} examples in {ours['rows']} x {args.seq_len}")):
        rows.append((name, shape, f"{r['slots_per_step']:.0f}", f"{r['sup_per_step']:.0f}",
                     f"{r['s_per_step']:.2f}", f"{r['sup_per_step'] / r['s_per_step']:.1f}"))
    ratio = (ours["sup_per_step"] / ours["s_per_step"]) / (theirs["sup_per_step"] / theirs["s_per_step"])
    print(f"\n{common.machine()}, {datetime.date.today()}, torch threads {args.threads}, float32\n")
    print(_table(rows))
    print(f"\nsupervised tokens/s, ours / official: {ratio:.2f}x (our compile: {ours['compile_s']:.0f} s)")
    if args.gen_tokens:
        prompts = [tokenizer(r["prefix"])["input_ids"] for r in records[:args.gen_batch]]
        g = bench_generation(cfg, params, model, prompts, args.gen_tokens)
        print(f"\ngeneration, batch {len(prompts)}, {args.gen_tokens} new tokens, greedy: ours "
              f"{g['ours_tok_s']:.1f} tok/s (first call with compile {g['ours_first_call_s']:.0f} s), "
              f"transformers {g['hf_tok_s']:.1f} tok/s, ratio {g['ours_tok_s'] / g['hf_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
