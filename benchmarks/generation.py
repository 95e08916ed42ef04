"""Greedy generation speed on SmolLM2-135M-Instruct: derta_jax vs transformers `generate`.

    python -m benchmarks.generation [--new-tokens 64] [--batches 1,16] [--threads 2]
    python -m benchmarks.generation --eval-set derta_jax/data/demo/eval/helpfulness_broad.jsonl \
        [--limit 64] [--new-tokens 256] [--batches 16]

Both sides get the same chat-templated prompts (of different lengths, left-padded), decode
greedily and generate exactly --new-tokens tokens per row (eos ignored), in float32 on the CPU.
With --eval-set, the prompts are the first --limit questions of an eval file instead, in batches
of each --batches size, and every row stops at the eval's stop ids (eos, end of turn) or at
--new-tokens, as in `python -m derta_jax.eval`: each side counts the tokens it generated.
Tokens/s counts generated tokens only, prefill included in the time. Ours is timed after one
warm-up call that compiles it (the compile time is shown separately). Prints a table; asserts
nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import common  # noqa: E402
from derta_jax.checkpoints.gguf import load_gguf  # noqa: E402
from derta_jax.evaluation import tasks  # noqa: E402
from derta_jax.evaluation.generation import generate  # noqa: E402

QUESTIONS = ["How do I bake bread?", "What is the capital of France?",
             "Write a haiku about the sea.", "Explain photosynthesis to a child in two sentences.",
             "List three prime numbers.", "Why is the sky blue?", "Give me a tip for learning Python.",
             "What is 17 times 3?"]


def _prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _questions(path: str, limit: int) -> list[str]:
    """The first `limit` questions of a JSON-lines eval file."""
    if not os.path.isfile(path):
        raise ValueError(f"--eval-set {path}: no such file")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()][:limit]
    missing = [i + 1 for i, row in enumerate(rows) if "question" not in row]
    if missing:
        raise ValueError(f"--eval-set {path}: line {missing[0]} has no `question`")
    return [row["question"] for row in rows]


def time_ours(cfg, params, prompts: list[list[int]], new_tokens: int, batch: int,
              stop_ids: tuple[int, ...]) -> tuple[float, float, int]:
    """(seconds of the timed call, seconds of the first, compiling, call, tokens generated)."""
    def run():
        out = generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=stop_ids,
                       batch_size=batch, progress=False)
        assert stop_ids or all(len(g.token_ids) == new_tokens for g in out)
        return sum(len(g.token_ids) for g in out)

    first, _ = common.timed(run, warmup=False)
    seconds, tokens = common.timed(run, warmup=False)
    return seconds, first, tokens


def time_transformers(model, tokenizer, prompts: list[list[int]], new_tokens: int, batch: int,
                      stop_ids: tuple[int, ...]) -> tuple[float, int]:
    """(seconds, tokens generated): `generate` on each batch of prompts in turn; with stop ids a
    row's tokens end at its first stop id (excluded, as ours), else it makes exactly new_tokens."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id or 0
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)
    if stop_ids:
        kwargs["eos_token_id"] = list(stop_ids)
    else:
        kwargs["min_new_tokens"] = new_tokens
    batches = [tokenizer.pad({"input_ids": prompts[i:i + batch]}, return_tensors="pt")
               for i in range(0, len(prompts), batch)]

    def run():
        tokens = 0
        for inputs in batches:
            out = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:].tolist()
            for row in out:
                cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
                tokens += cut
            assert stop_ids or all(len(row) == new_tokens for row in out)
        return tokens

    with torch.no_grad():
        model.generate(**batches[0], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        return common.timed(run, warmup=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--eval-set", help="JSON lines with `question`: its prompts, eval's stop ids")
    parser.add_argument("--limit", type=int, default=64, help="--eval-set questions used")
    args = parser.parse_args()
    questions = _questions(args.eval_set, args.limit) if args.eval_set else []
    if args.threads:
        torch.set_num_threads(args.threads)
    path = common.smollm2_gguf()
    cfg, params, tokenizer = load_gguf(path, progress=False)
    params = jax.device_put(params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    stop_ids: tuple[int, ...] = ()
    workload = f"{args.new_tokens} new tokens per row, eos ignored"
    if args.eval_set:
        stop_ids = tasks.stop_ids(cfg, tokenizer)
        workload = (f"the first {len(questions)} prompts of {args.eval_set}, up to {args.new_tokens} "
                    f"new tokens, stop ids {list(stop_ids)}")
    print(f"SmolLM2-135M float32, greedy, {workload}; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{common.machine()}")
    print("| batch | ours tokens | ours tok/s | transformers tokens | transformers tok/s "
          "| ours / transformers (tok/s) | ours compile s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in (int(x) for x in args.batches.split(",")):
        prompts = _prompts(tokenizer, questions if args.eval_set else
                           [QUESTIONS[i % len(QUESTIONS)] for i in range(b)])
        ours, first, n_ours = time_ours(cfg, params, prompts, args.new_tokens, b, stop_ids)
        theirs, n_theirs = time_transformers(model, tokenizer, prompts, args.new_tokens, b, stop_ids)
        print(f"| {b} | {n_ours} | {n_ours / ours:.1f} | {n_theirs} | {n_theirs / theirs:.1f} "
              f"| {n_ours / ours / (n_theirs / theirs):.2f}x | {first - ours:.1f} |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
