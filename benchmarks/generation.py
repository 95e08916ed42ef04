"""Greedy generation speed on SmolLM2-135M-Instruct: derta_jax vs transformers `generate`.

    python -m benchmarks.generation [--new-tokens 64] [--batches 1,16] [--threads 2]

Both sides get the same chat-templated prompts (of different lengths, left-padded), decode
greedily and generate exactly --new-tokens tokens per row (eos ignored), in float32 on the CPU.
Tokens/s counts generated tokens only, prefill included in the time. Ours is timed after one
warm-up call that compiles it (the compile time is shown separately). Prints a table; asserts
nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import common  # noqa: E402
from derta_jax.checkpoints.gguf import load_gguf  # noqa: E402
from derta_jax.evaluation.generation import generate  # noqa: E402

QUESTIONS = ["How do I bake bread?", "What is the capital of France?",
             "Write a haiku about the sea.", "Explain photosynthesis to a child in two sentences.",
             "List three prime numbers.", "Why is the sky blue?", "Give me a tip for learning Python.",
             "What is 17 times 3?"]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           tokenize=False, add_generation_prompt=True) for i in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def time_ours(cfg, params, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds of the timed call, seconds of the first, compiling, call)."""
    def run():
        out = generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=[],
                       batch_size=len(prompts), progress=False)
        assert all(len(g.token_ids) == new_tokens for g in out)

    first, _ = common.timed(run, warmup=False)
    seconds, _ = common.timed(run, warmup=False)
    return seconds, first


def time_transformers(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        model.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        elapsed, out = common.timed(lambda: model.generate(**batch, **kwargs), warmup=False)
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = common.smollm2_gguf()
    cfg, params, tokenizer = load_gguf(path, progress=False)
    params = jax.device_put(params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    print(f"SmolLM2-135M float32, greedy, {args.new_tokens} new tokens per row; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{common.machine()}")
    print("| batch | ours tok/s | transformers tok/s | ours / transformers | ours compile s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for b in (int(x) for x in args.batches.split(",")):
        prompts = _prompts(tokenizer, b)
        ours, first = time_ours(cfg, params, prompts, args.new_tokens)
        theirs = time_transformers(model, tokenizer, prompts, args.new_tokens)
        n = b * args.new_tokens
        print(f"| {b} | {n / ours:.1f} | {n / theirs:.1f} | {theirs / ours:.2f}x | {first - ours:.1f} |",
              flush=True)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
