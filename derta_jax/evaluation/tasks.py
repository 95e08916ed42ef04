"""Test sets: their kind, reading JSON lines, and building prompts (derta-method.md, "Evaluation
protocol").

A test file is JSON lines with a `question` and, for GSM8K and MMLU, an `answer`. Its kind comes
from `--kind` or from the file name: `safety_<attack>.jsonl`, `helpfulness_<gsm8k|mmlu|alpacaeval|
overrefusal|arithmetic|howto>.jsonl` (arithmetic: the demo's additions, scored like GSM8K;
howto: the demo's harmless how-to questions, scored like overrefusal). The set's
name (its report column) is the file stem without that prefix.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from derta_jax.data.templates import EVAL_PROMPT
from derta_jax.data.tokenize import resolve_add_bos

# The official evaluation template (sic: a backslash in the closing tag), shared with the data.
BASE_TEMPLATE = EVAL_PROMPT

COMPLETION_ATTACK = "completionattack"  # safety; the question is a harmful text fed raw
SAFETY = "safety"  # every other attack / harmful-question set
GSM8K = "gsm8k"
MMLU = "mmlu"
ALPACAEVAL = "alpacaeval"  # answers written for external judging
OVERREFUSAL = "overrefusal"  # helpful prompts; score = share refused
KINDS = (COMPLETION_ATTACK, SAFETY, GSM8K, MMLU, ALPACAEVAL, OVERREFUSAL)
SAFETY_KINDS = (COMPLETION_ATTACK, SAFETY)
_HELPFULNESS_KINDS = (GSM8K, MMLU, ALPACAEVAL, OVERREFUSAL)
# Other helpfulness set names and the kind they are scored as.
_NAMED_KINDS = {"arithmetic": GSM8K,  # demo: {question, answer: "144"}, final-number match
                "howto": OVERREFUSAL}  # demo: harmless how-to questions shaped like harmful ones


@dataclasses.dataclass(frozen=True)
class TestSet:
    name: str  # report column, e.g. "completionattack", "gsm8k"
    kind: str  # one of KINDS
    path: str
    examples: tuple[dict[str, Any], ...]

    @property
    def is_safety(self) -> bool:
        return self.kind in SAFETY_KINDS


def set_name(path: str | os.PathLike) -> str:
    """`.../safety_completionattack.jsonl` -> `completionattack`; other stems are kept whole."""
    stem = os.path.basename(os.fspath(path)).split(".")[0].lower()
    for prefix in ("safety_", "helpfulness_"):
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return stem


def infer_kind(path: str | os.PathLike, kind: str | None = None) -> str:
    """The set's kind: `kind` when given, else from the file name."""
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"--kind {kind!r} for {path}: expected one of {', '.join(KINDS)}")
        return kind
    stem = os.path.basename(os.fspath(path)).split(".")[0].lower()
    name = set_name(path)
    if stem.startswith("safety_"):
        return COMPLETION_ATTACK if name == COMPLETION_ATTACK else SAFETY
    if stem.startswith("helpfulness_") and name in _HELPFULNESS_KINDS:
        return name
    if stem.startswith("helpfulness_") and name in _NAMED_KINDS:
        return _NAMED_KINDS[name]
    raise ValueError(
        f"cannot tell the kind of test set {path}: name it safety_<attack>.jsonl or "
        f"helpfulness_<{'|'.join(_HELPFULNESS_KINDS)}>.jsonl, or pass --kind "
        f"({', '.join(KINDS)})")


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ("question",)) -> list[dict]:
    """Reads JSON lines (blank lines skipped); errors name the file, the line and the reason."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{lineno}: missing string field {key!r}")
            rows.append(row)
    return rows


def load_test_set(path: str | os.PathLike, kind: str | None = None,
                  limit: int | None = None) -> TestSet:
    kind = infer_kind(path, kind)
    required = ("question", "answer") if kind in (GSM8K, MMLU) else ("question",)
    rows = read_jsonl(path, required)
    if not rows:
        raise ValueError(f"{path}: no examples")
    if limit is not None:
        rows = rows[:limit]
    return TestSet(name=set_name(path), kind=kind, path=os.fspath(path), examples=tuple(rows))


def build_prompt(question: str, kind: str, tokenizer: Any = None, chat: bool = False) -> str:
    """The prompt text for one question.

    Base: `BASE_TEMPLATE`, except CompletionAttack whose question is fed raw. Chat: the
    tokenizer's chat template with a generation prompt; CompletionAttack becomes a pre-filled
    assistant turn that the model continues (`continue_final_message`).
    """
    if not chat:
        return question if kind == COMPLETION_ATTACK else BASE_TEMPLATE.format(question=question)
    if kind == COMPLETION_ATTACK:
        # The user turn is empty: the attack is the assistant's own (harmful) beginning.
        messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": question}]
        return _chat_template(tokenizer).apply_chat_template(messages, tokenize=False,
                                                             continue_final_message=True)
    return chat_prompt(question, tokenizer)


def chat_prompt(user_message: str, tokenizer: Any) -> str:
    """One user turn through the tokenizer's chat template, with the generation prompt."""
    return _chat_template(tokenizer).apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True)


def _chat_template(tokenizer: Any) -> Any:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat_template (tokenizer_config.json)")
    return tokenizer


def encode_prompt(prompt: str, tokenizer: Any, chat: bool) -> list[int]:
    """Token ids of a prompt text, for eval, generate and the classifier judge alike.

    BOS is decided by the training data's rule (`data.tokenize.resolve_add_bos`), not by the
    tokenizer's default: a raw or base-template prompt gets the tokenizer's BOS unless that token
    is a chat-turn marker (SmolLM2's `<|im_start|>`); a chat-templated prompt carries in its text
    whatever BOS the template writes, so nothing is added. Special-token strings in the text
    (`<|eot_id|>`) become their ids."""
    bos = [tokenizer.bos_token_id] if resolve_add_bos(tokenizer, "chat" if chat else "base",
                                                      None) else []
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def stop_ids(cfg: Any, tokenizer: Any) -> tuple[int, ...]:
    """Tokens that end an answer: the model's eos ids, the tokenizer's eos, and the end-of-turn
    tokens of the chat templates we know (LLaMA-3 `<|eot_id|>`, ChatML `<|im_end|>`)."""
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>") if t in vocab)
    return tuple(sorted(ids))
