"""Helpful pairs from the model itself: instructions it samples, answers it gives greedily.

    python -m derta_jax.data.selfgen --checkpoint M --n N --out F.jsonl [--seeds FILE] [--seed 0] \
        [--batch-size 64] [--max-instruction-tokens 64] [--max-new-tokens 192] \
        [--temperature 1.0] [--top-p 1.0] [--exclude A.jsonl,...] [--judge refusal-anywhere] \
        [--dtype D] [--no-progress]

Mixed into a DeRTa recipe as helpful data (`data.helpful=demo.jsonl,F.jsonl`), the pairs anchor
the model to what it already answered well, where a few narrow hand-written pairs teach it to
refuse whatever looks like the safety data.

- Instructions (Magpie, Xu et al. 2024): the chat template rendered up to where the user's
  message starts (the "pre-query template", `<|im_start|>system ...<|im_end|>\\n<|im_start|>user\\n`
  for SmolLM2) and the model samples the user message until its end of turn, at temperature 1
  and top-p 1 as Magpie does. With `--seeds FILE` (one opening per line, e.g. "Give me
  step-by-step instructions to"), each instruction starts with an opening drawn at random and
  the model continues it, which steers the mix of tasks.
- Answers: the same model, greedy, through the chat template as eval prompts it.
- Dropped and counted by reason (F.stats.json, and printed): instructions the model did not end
  within --max-instruction-tokens, shorter than 4 words, or mostly not printable ASCII; near
  duplicates of a kept instruction (word-set Jaccard >= 0.8); instructions that overlap a
  held-out prompt (the demo's eval sets plus --exclude files: the same words, one containing the
  other, or Jaccard >= 0.8); instructions with a word of `HARM_WORDS`; answers cut at
  --max-new-tokens, empty, or flagged by the judge (default `refusal-anywhere`: any refusal
  phrase, so a declined request never becomes "helpful" data; `classifier:<dir>` and
  `http:<url>` judge the pair as eval does).
- Deterministic for a seed (same machine, batch size and model). Candidates are drawn in rounds
  until N pairs are kept or `--max-candidates` (default 4 N) instructions were sampled; fewer
  than N is reported, never padded.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import pathlib
import random
import re
from typing import Any, Callable, Sequence

from derta_jax import cli, storage

# Instructions with these words are dropped before they are answered: the anchor data must not
# teach "comply" on requests near the safety data's topics (a coarse screen; use a classifier
# judge for the answers).
HARM_WORDS = frozenset("""
    abuse assault bomb bombs bully cocaine counterfeit drug drugs explosive explosives extort fraud
    gun guns hack hacking harass harm heroin illegal kidnap kill killing launder malware meth murder
    phishing poison ransomware scam scams shoplift stalk steal stealing suicide terror terrorist
    theft threaten torture violence violent weapon weapons
""".split())
# The demo's pairs: where configs/smollm2.py reads them and how scripts/demo.sh and the
# ablation make them (from the untouched model).
DEMO_PAIRS = "runs/selfgen/smollm2-135m.jsonl"
DEMO_ARGS = ("--n", "64", "--seeds", "derta_jax/data/demo/selfgen_seeds.txt",
             "--max-new-tokens", "192")
MIN_WORDS = 4
NEAR_DUPLICATE = 0.8  # word-set Jaccard at or above which two instructions are the same
_WORDS = re.compile(r"[a-z0-9]+")

GenerateFn = Callable[[list[str], str], list[tuple[str, bool]]]  # (texts, "instruct"|"answer")
JudgeFn = Callable[[list[tuple[str, str]]], list[bool]]  # (instruction, answer) -> flagged


def words(text: str) -> frozenset[str]:
    return frozenset(_WORDS.findall(text.lower()))


def _normal(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class HeldOut:
    """Held-out prompts, and whether a text matches one: the same words, one inside the other,
    or a word-set Jaccard >= NEAR_DUPLICATE."""

    def __init__(self, prompts: Sequence[str] = ()):
        self._prompts = [(_normal(p), words(p)) for p in prompts if _normal(p)]

    def matches(self, text: str) -> bool:
        norm, bag = _normal(text), words(text)
        return any(o in norm or norm in o or jaccard(bag, b) >= NEAR_DUPLICATE
                   for o, b in self._prompts)


@dataclasses.dataclass
class Result:
    pairs: list[dict[str, str]]
    candidates: int
    dropped: collections.Counter

    def summary(self, n: int) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
        return (f"kept {len(self.pairs)} of {n} asked, from {self.candidates} sampled "
                f"instructions; dropped: {reasons or 'none'}")


def _instruction_reason(text: str, finished: bool, kept: list[frozenset[str]],
                        held_out: HeldOut) -> str | None:
    """Why an instruction is dropped, or None to keep it."""
    if not finished:
        return "instruction_truncated"
    if len(text.split()) < MIN_WORDS:
        return "instruction_short"
    if sum(32 <= ord(c) < 127 or c in "\n\t" for c in text) < 0.95 * len(text):
        return "instruction_not_ascii"
    bag = words(text)
    if bag & HARM_WORDS:
        return "instruction_harm_word"
    if held_out.matches(text):
        return "instruction_held_out"
    if any(jaccard(bag, k) >= NEAR_DUPLICATE for k in kept):
        return "instruction_duplicate"
    return None


def self_generate(generate: GenerateFn, judge: JudgeFn, n: int, seeds: Sequence[str] = (),
                  held_out: HeldOut = HeldOut(), seed: int = 0, round_size: int = 64,
                  max_candidates: int | None = None,
                  progress: Callable[[Result], None] | None = None
                  ) -> Result:
    """Up to `n` pairs: rounds of `round_size` sampled instructions (openings drawn from `seeds`
    when given), filtered, answered, filtered, until n are kept or `max_candidates` (4 n)."""
    if n < 1:
        raise ValueError(f"--n {n}: expected >= 1")
    rng = random.Random(seed)
    max_candidates = 4 * n if max_candidates is None else max_candidates
    pairs: list[dict[str, str]] = []
    kept: list[frozenset[str]] = []
    dropped: collections.Counter = collections.Counter()
    candidates = 0
    while len(pairs) < n and candidates < max_candidates:
        size = min(round_size, max_candidates - candidates)
        openings = [rng.choice(seeds) if seeds else "" for _ in range(size)]
        candidates += size
        instructions = []
        for opening, (text, finished) in zip(openings, generate(openings, "instruct")):
            text = (opening + text).strip()
            reason = _instruction_reason(text, finished, kept, held_out)
            if reason is None:
                instructions.append(text)
                kept.append(words(text))
            else:
                dropped[reason] += 1
        if not instructions:
            continue
        answers = generate(instructions, "answer")
        flags = judge([(q, a) for q, (a, _) in zip(instructions, answers)])
        for q, (a, finished), flagged in zip(instructions, answers, flags):
            reason = ("answer_truncated" if not finished else "answer_empty" if not a.strip()
                      else "answer_flagged" if flagged else None)
            if reason is not None:
                dropped[reason] += 1
            elif len(pairs) < n:
                pairs.append({"instruction": q, "output": a.strip()})
            else:
                dropped["over_n"] += 1
        if progress is not None:
            progress(Result(pairs, candidates, dropped))
    return Result(pairs, candidates, dropped)


def pre_query(tokenizer: Any) -> str:
    """The chat template rendered up to where the user's message starts (Magpie)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("selfgen needs a chat model: the tokenizer has no chat_template")
    mark = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                         add_generation_prompt=True)
    return text[:text.index(mark)]


def read_held_out(paths: Sequence[str | pathlib.Path]) -> list[str]:
    """The `question`s of eval files (JSON lines)."""
    from derta_jax.evaluation.tasks import read_jsonl
    return [row["question"] for p in paths for row in read_jsonl(p)]


def read_seeds(path: str | pathlib.Path) -> list[str]:
    seeds = [line.strip() for line in storage.path(path).read_text(encoding="utf-8").splitlines()]
    seeds = [s for s in seeds if s]
    if not seeds:
        raise ValueError(f"--seeds {path}: no openings (one per line)")
    return seeds


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m derta_jax.data.selfgen",
                           description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model dir or training workdir (a chat model)")
    p.add_argument("--n", type=int, required=True, help="pairs to keep")
    p.add_argument("--out", required=True, help="JSON lines {instruction, output}")
    p.add_argument("--seeds", default=None, help="openings of instructions, one per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-instruction-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=192, help="answer length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="instruction sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="instruction sampling")
    p.add_argument("--max-candidates", type=int, default=None, help="default: 4 x --n")
    p.add_argument("--exclude", default="", help="more held-out eval files (comma-separated)")
    p.add_argument("--judge", default="refusal-anywhere",
                   help="flags answers (eval's --judge specs; default: any refusal phrase)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _model_fns(args: argparse.Namespace) -> tuple[GenerateFn, JudgeFn]:
    """generate(texts, "instruct"|"answer") and judge(pairs) over the loaded model."""
    from derta_jax.evaluation import judges, loading, tasks
    from derta_jax.evaluation.generation import generate as generate_ids
    model = loading.load_eval_model(args.checkpoint, args.dtype)
    tok, head = model.tokenizer, pre_query(model.tokenizer)
    stops = tasks.stop_ids(model.cfg, tok)
    calls = itertools.count()  # a fresh sampling seed per round, from --seed

    def generate(texts: list[str], what: str) -> list[tuple[str, bool]]:
        sampled = what == "instruct"
        prompts = [head + t if sampled else tasks.chat_prompt(t, tok) for t in texts]
        out = generate_ids(
            model.params, model.cfg, [tasks.encode_prompt(p, tok, chat=True) for p in prompts],
            max_new_tokens=args.max_instruction_tokens if sampled else args.max_new_tokens,
            stop_ids=stops, batch_size=args.batch_size,
            temperature=args.temperature if sampled else 0.0, top_p=args.top_p if sampled else 1.0,
            seed=args.seed * 100_003 + next(calls), progress=False)
        return [(tok.decode(g.token_ids), g.finish_reason == "stop") for g in out]

    judge = judges.make_judge(args.judge, tok, args.batch_size,
                              load_model=lambda path: loading.load_eval_model(path, args.dtype))

    def flag(pairs: list[tuple[str, str]]) -> list[bool]:
        verdicts = judge([judges.Answer(q, a) for q, a in pairs])
        if isinstance(judge, judges.RefusalJudge):
            return [bool(v["refused"]) for v in verdicts]
        return [v["harmful"] is not False for v in verdicts]  # undecided counts as flagged

    return generate, flag


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes --out and <out stem>.stats.json; returns the stats."""
    from tqdm import tqdm
    from derta_jax.data.pipeline import DEMO_EVAL_DIR
    args = _parse(argv)
    out = storage.path(args.out)  # a local path or a URL
    for flag in ("n", "batch_size", "max_instruction_tokens", "max_new_tokens"):
        if getattr(args, flag) < 1:  # before the model loads
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")
    seeds = read_seeds(args.seeds) if args.seeds else []
    exclude = sorted(DEMO_EVAL_DIR.glob("*.jsonl")) + [p for p in args.exclude.split(",") if p]
    held_out = HeldOut(read_held_out(exclude))
    generate, flag = _model_fns(args)
    bar = tqdm(total=args.n, desc="selfgen", unit="pair", disable=args.no_progress)

    def progress(so_far: Result) -> None:  # after each round
        bar.update(len(so_far.pairs) - bar.n)
        bar.set_postfix_str(f"sampled {so_far.candidates}, dropped {dict(so_far.dropped)}")

    result = self_generate(generate, flag, args.n, seeds, held_out, args.seed, args.batch_size,
                           args.max_candidates, progress)
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for pair in result.pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    stats = {"kept": len(result.pairs), "asked": args.n, "candidates": result.candidates,
             "dropped": dict(sorted(result.dropped.items())), "checkpoint": args.checkpoint,
             "seed": args.seed, "seeds_file": args.seeds, "held_out_files": [str(p) for p in exclude]}
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"{result.summary(args.n)}; wrote {out}")
    return stats


if __name__ == "__main__":
    cli.run_main(main)
