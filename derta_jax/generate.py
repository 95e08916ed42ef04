"""Generate answers for a JSON-lines file of prompts with a model dir or a training workdir.

    python -m derta_jax.generate --checkpoint <model dir | training workdir> [--step N] \
        --prompts in.jsonl --out out.jsonl --max-new-tokens N [--chat] \
        [--temperature T --top-p P] [--batch-size B] [--dtype D] [--mesh DATA,FSDP,TENSOR]

Each input line needs a "prompt". Each output line: prompt, response, num_tokens, finish_reason
("stop" or "length"). Greedy by default. The model is loaded as eval loads it
(`evaluation/loading.py`: latest workdir step unless --step, LoRA merged) and prompts are tokenised
as eval tokenises them (`evaluation/tasks.encode_prompt`): without --chat the raw prompt, with BOS
by the training data's rule; with --chat the tokenizer's chat template with a generation prompt.
Batches run over every device (rows split on the data axis). Generation stops at the model's eos
ids, the tokenizer's eos and the end-of-turn tokens (`<|eot_id|>`, `<|im_end|>`).
--checkpoint, --prompts and --out may be bucket URLs (gs://...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from derta_jax import cli, storage
from derta_jax.checkpoints.resolve import resolve_checkpoint
from derta_jax.evaluation import loading, tasks
from derta_jax.evaluation.generation import generate


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m derta_jax.generate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=storage.path, required=True,
                   help="a model dir, or a training workdir (latest step unless --step); a "
                   "folder or a gs:// URL")
    p.add_argument("--step", type=int, default=None, help="training workdir step to load")
    p.add_argument("--prompts", type=storage.path, required=True,
                   help='jsonl with a "prompt" per line (a file or a gs:// URL)')
    p.add_argument("--out", type=storage.path, required=True,
                   help="jsonl to write (a file or a gs:// URL)")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute and parameter dtype (default: as stored)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="device mesh (one size may be -1; default: every device on data)")
    return p.parse_args(argv)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The "prompt" of each object of a JSON-lines file (or JSON array); errors name the line."""
    prompts = [row["prompt"] for row in tasks.read_jsonl(path, ("prompt",))]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def encode(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token ids of one prompt: raw, or as a user turn of the chat template (`--chat`)."""
    text = tasks.chat_prompt(prompt, tokenizer) if chat else prompt
    return tasks.encode_prompt(text, tokenizer, chat)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse(argv)
    prompts = read_prompts(args.prompts)
    model = loading.load_eval_model(resolve_checkpoint(args.checkpoint, args.step), args.dtype,
                                    loading.parse_mesh(args.mesh))
    tokenizer = model.tokenizer
    ids = [encode(tokenizer, p, args.chat) for p in prompts]
    outs = generate(model.params, model.cfg, ids, max_new_tokens=args.max_new_tokens,
                    stop_ids=tasks.stop_ids(model.cfg, tokenizer), batch_size=args.batch_size,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    rows = [{"prompt": p, "response": tokenizer.decode(g.token_ids, skip_special_tokens=True),
             "num_tokens": len(g.token_ids), "finish_reason": g.finish_reason}
            for p, g in zip(prompts, outs)]
    if not storage.is_url(args.out):
        args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                        encoding="utf-8")
    print(f"wrote {len(rows)} answers to {args.out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    cli.run_main(main)
