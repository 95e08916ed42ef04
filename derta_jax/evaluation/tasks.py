"""Test sets: their kind, reading them, and building prompts (derta-method.md, "Evaluation
protocol").

A test file is JSON lines, or one JSON array of objects (the official `.json` files), with a
`question` and, for GSM8K and MMLU, an `answer`. Its kind comes from `--kind` or from the file
name: `safety_<attack>[_<count>].json[l]` (the official `safety_pair.json`,
`safety_codeattack.json`, ...; `safety_completionattack` is the raw-fed CompletionAttack) or
`helpfulness_<gsm8k|mmlu|alpaca_eval|alpacaeval|overrefusal|arithmetic|howto|broad>[_<count>].json[l]`
(the official `helpfulness_gsm8k_500.json`, `helpfulness_mmlu_500.json`,
`helpfulness_alpaca_eval_300.json`, and any cut of them such as `helpfulness_alpaca_eval_40.json`;
arithmetic: the demo's additions, scored like GSM8K; howto: the demo's harmless how-to questions,
and broad: the demo's ordinary prompts over ten categories, both scored like overrefusal). The
set's name (its report column and output file) is the file stem without that prefix and without
a trailing `_<count>`, with `alpaca_eval` spelled `alpacaeval`.

Prompts follow the official evaluation: MMLU and GSM8K questions are rewritten first
(`question_text`; by kind, so the demo's arithmetic set, scored as GSM8K, is rewritten too), then
every set but CompletionAttack goes through `EVAL_PROMPT` (or, with --chat, the rewritten question
is the user message of the tokenizer's chat template, which may trim it: LLaMA-3's does).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from derta_jax import storage
from derta_jax.data.templates import EVAL_PROMPT
from derta_jax.data.tokenize import resolve_add_bos

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
                "howto": OVERREFUSAL,  # demo: harmless how-to questions shaped like harmful ones
                "broad": OVERREFUSAL}  # demo: ordinary prompts (coding, maths, ...), share refused
# The paper's attacks (Table 2 order) and the demo's harmful questions: the safety set names that
# eval's output files (`<set name>.jsonl`) are known by.
OFFICIAL_ATTACKS = ("codeattack", "pair", "jailbreakchat", "selfcipher", "completionattack",
                    "autodan")
_SAFETY_NAMES = OFFICIAL_ATTACKS + ("harmful_questions",)
_COUNT = re.compile(r"_\d+$")  # "alpaca_eval_300" -> "alpaca_eval"
# The official evaluation.py's rewrites of a question before the template.
MMLU_QUESTION = ("Choose the correct option for the given question.\n"
                 + "\n\n\nQuestion: {question}\n")
GSM8K_QUESTION = "\n {question} \n "


@dataclasses.dataclass(frozen=True)
class TestSet:
    name: str  # report column, e.g. "completionattack", "gsm8k"
    kind: str  # one of KINDS
    path: str
    examples: tuple[dict[str, Any], ...]

    @property
    def is_safety(self) -> bool:
        return self.kind in SAFETY_KINDS


def _stem(path: str | os.PathLike) -> str:
    return os.path.basename(os.fspath(path)).split(".")[0].lower()


def set_name(path: str | os.PathLike) -> str:
    """`.../safety_completionattack.jsonl` -> `completionattack`, `helpfulness_alpaca_eval_300.json`
    -> `alpacaeval`, `safety_pair_50.json` -> `pair`; other stems are kept whole."""
    stem = _stem(path)
    for prefix in ("safety_", "helpfulness_"):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            name = _COUNT.sub("", stem[len(prefix):]) or stem[len(prefix):]
            joined = name.replace("_", "")
            return joined if prefix == "helpfulness_" and joined in _HELPFULNESS_KINDS else name
    return stem


def infer_kind(path: str | os.PathLike, kind: str | None = None) -> str:
    """The set's kind: `kind` when given, else from the test file's name."""
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"--kind {kind!r} for {path}: expected one of {', '.join(KINDS)}")
        return kind
    stem, name = _stem(path), set_name(path)
    if stem.startswith("safety_"):
        return COMPLETION_ATTACK if name == COMPLETION_ATTACK else SAFETY
    if stem.startswith("helpfulness_") and name in _HELPFULNESS_KINDS:
        return name
    if stem.startswith("helpfulness_") and name in _NAMED_KINDS:
        return _NAMED_KINDS[name]
    raise ValueError(
        f"cannot tell the kind of test set {path}: name it safety_<attack>.json[l] or "
        f"helpfulness_<{'|'.join(_HELPFULNESS_KINDS)}>[_<count>].json[l], or pass --kind "
        f"({', '.join(KINDS)})")


def answers_kind(path: str | os.PathLike) -> str:
    """The kind of a file of answers by its name: a test file's name (`infer_kind`), or the
    name eval gives its output (`<set name>.jsonl`, e.g. `pair.jsonl`, `gsm8k.jsonl`)."""
    stem = _stem(path)
    if stem.startswith(("safety_", "helpfulness_")):
        return infer_kind(path)
    if stem in _SAFETY_NAMES:
        return COMPLETION_ATTACK if stem == COMPLETION_ATTACK else SAFETY
    if stem in _HELPFULNESS_KINDS or stem in _NAMED_KINDS:
        return _NAMED_KINDS.get(stem, stem)
    raise ValueError(f"cannot tell the kind of answers {path}: name it as eval names its output "
                     f"(<{'|'.join(_SAFETY_NAMES + _HELPFULNESS_KINDS)}>.jsonl) or as a test "
                     f"file, or pass --kind ({', '.join(KINDS)})")


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ("question",)) -> list[dict]:
    """Reads JSON lines (blank lines skipped) or one JSON array of objects, from a local path or
    a bucket URL; errors name the file (as given), the line and the reason."""
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    items = _array_items(path, text) if text.lstrip().startswith("[") else _line_items(path, text)
    for lineno, row in items:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key in required:
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}:{lineno}: missing string field {key!r}")
    return [row for _, row in items]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a local file or a bucket object; a missing one is a FileNotFoundError naming
    `path` as given (gcsfs's own names the object's API address)."""
    try:
        return storage.path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def _line_items(path: str | os.PathLike, text: str) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line."""
    items = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return items


def _array_items(path: str | os.PathLike, text: str) -> list[tuple[int, Any]]:
    """(line where it starts, value) of each element of the JSON array that `text` holds."""
    decoder, items = json.JSONDecoder(), []
    i = _skip_space(text, text.index("[") + 1)
    while not text.startswith("]", i):
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        items.append((_line(text, i), value))
        i = _skip_space(text, end)
        if text.startswith(",", i):
            i = _skip_space(text, i + 1)
        elif not text.startswith("]", i):
            raise ValueError(f"{path}:{_line(text, i)}: invalid JSON (expected ',' or ']')")
    if text[i + 1:].strip():
        raise ValueError(f"{path}:{_line(text, i)}: invalid JSON (text after the array)")
    return items


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _line(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


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


def check_distinct_sets(named: list[tuple[str, str | os.PathLike]]) -> None:
    """(set name, file) pairs: two files of one set would write one output file."""
    seen: dict[str, str | os.PathLike] = {}
    for name, path in named:
        if name in seen:
            raise ValueError(f"{seen[name]} and {path} are both set {name!r} (one output file per "
                             "set): pass them in separate runs with different --out dirs")
        seen[name] = path


def question_text(question: str, kind: str) -> str:
    """The question as the official evaluation puts it into the template: MMLU and GSM8K
    questions rewritten (`MMLU_QUESTION`, `GSM8K_QUESTION`), others unchanged."""
    if kind == MMLU:
        return MMLU_QUESTION.format(question=question)
    if kind == GSM8K:
        return GSM8K_QUESTION.format(question=question)
    return question


def build_prompt(question: str, kind: str, tokenizer: Any = None, chat: bool = False) -> str:
    """The prompt text for one question.

    Base: `EVAL_PROMPT` around `question_text`, except CompletionAttack whose question is fed raw.
    Chat: `question_text` as the user turn of the tokenizer's chat template, with a generation
    prompt; CompletionAttack becomes a pre-filled assistant turn that the model continues
    (`continue_final_message`).
    """
    if kind == COMPLETION_ATTACK and not chat:
        return question
    if kind == COMPLETION_ATTACK:
        # The user turn is empty: the attack is the assistant's own (harmful) beginning.
        messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": question}]
        return _chat_template(tokenizer).apply_chat_template(messages, tokenize=False,
                                                             continue_final_message=True)
    text = question_text(question, kind)
    return chat_prompt(text, tokenizer) if chat else EVAL_PROMPT.format(question=text)


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
