"""Prompt templates: the official `[INST] ... [\\INST]` base template and a tokenizer's chat template.

A `Template` turns a query into the prompt string and knows how a response continues it:

- `base` (the official recipe): prompt `"[INST] {query} [\\INST]"` (sic: a backslash), responses
  start with a space and end with the eos string (`<|end_of_text|>` in the official files).
- `chat`: the tokenizer's own chat template (LLaMA-3-Instruct, SmolLM2-Instruct) rendered with the
  generation prompt; responses start right after it (no leading space) and end with the
  end-of-turn token the template writes after an assistant message (`<|eot_id|>`, `<|im_end|>`).
  A harmful prefix sits inside the assistant turn: prompt + first words of r̂.
"""
from __future__ import annotations

import dataclasses
from typing import Any

BASE_PROMPT = "[INST] {query} [\\INST]"
# The official evaluation prompt (every test set except CompletionAttack, which is fed raw).
EVAL_PROMPT = "[INST] \n{question}\n\n [\\INST]"
OFFICIAL_EOS = "<|end_of_text|>"
_MARKER = "\u2063DERTA_RESPONSE\u2063"


@dataclasses.dataclass(frozen=True)
class Template:
    """How a query becomes a prompt and how a response continues it."""

    kind: str  # base | chat
    eos: str  # appended to every supervised text
    chat_prefix: str = ""  # chat only: the rendered conversation before the query
    chat_suffix: str = ""  # chat only: what follows the query up to the assistant's first token

    def __post_init__(self):
        if self.kind not in ("base", "chat"):
            raise ValueError(f"template kind={self.kind!r}: expected 'base' or 'chat'")
        if not self.eos:
            raise ValueError("template eos string is empty")

    @property
    def lead(self) -> str:
        """What a response starts with after the prompt: a space (base) or nothing (chat)."""
        return " " if self.kind == "base" else ""

    def prompt(self, query: str) -> str:
        if self.kind == "base":
            return BASE_PROMPT.format(query=query)
        return self.chat_prefix + query + self.chat_suffix

    def response(self, text: str) -> str:
        """A supervised text: lead + response + eos."""
        return self.lead + text + self.eos

    def harmful_prefix(self, query: str, words: list[str], i: int) -> tuple[str, str]:
        """Prompt with the first `i` words of r̂, and the lead of the text that follows it.

        Base (official, literal): `prompt + " " + " ".join(words[:i])`, so i = 0 leaves a trailing
        space, and the safe text still starts with a space. Chat: the words follow the generation
        prompt directly; the safe text starts with a space only when words precede it.
        """
        joined = " ".join(words[:i])
        if self.kind == "base":
            return self.prompt(query) + " " + joined, " "
        return self.prompt(query) + joined, (" " if i > 0 else "")


def base_template(eos: str = OFFICIAL_EOS) -> Template:
    return Template(kind="base", eos=eos)


def chat_template(tokenizer: Any) -> Template:
    """The tokenizer's chat template, split around the user's query, with its end-of-turn token."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True)
    before, marker, after = prompt.partition(_MARKER)
    if not marker:
        raise ValueError("the chat template does not reproduce the user's message verbatim")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARKER}], tokenize=False)
    tail = full.partition(_MARKER)[2]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        raise ValueError(
            f"cannot find the end-of-turn token after an assistant message in the chat template of "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} (text after the message: {tail[:40]!r})")
    return Template(kind="chat", eos=tokenizer.decode([ids[0]]), chat_prefix=before, chat_suffix=after)


def make_template(kind: str, tokenizer: Any = None, eos: str | None = None) -> Template:
    """`base` (eos defaults to the tokenizer's eos string, else the official one) or `chat`."""
    if kind == "base":
        if eos is None:
            eos = getattr(tokenizer, "eos_token", None) or OFFICIAL_EOS
        return base_template(eos)
    if kind == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer")
        return chat_template(tokenizer)
    raise ValueError(f"template={kind!r}: expected 'base' or 'chat'")
