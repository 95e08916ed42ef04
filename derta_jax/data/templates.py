"""Prompt templates: the official `[INST] ... [\\INST]` base template and a tokenizer's chat template.

A `Template` turns a query into the prompt string and knows how a response continues it:

- `base` (the official recipe): prompt `"[INST] {query} [\\INST]"` (sic: a backslash), responses
  start with a space and end with `eos_text`. Its default is the literal `<|end_of_text|>` of the
  official files, written for every model (LLaMA-3-70B-Instruct too, whose tokenizer's own eos is
  `<|eot_id|>`); the tokenizer's eos is never used, so `python -m derta_jax.data.build` and
  training give the same records. A tokenizer that has the string as a special token (LLaMA-3)
  encodes it as one id (128001); one that does not (SmolLM2) splits it into ordinary text
  (9 tokens `<` `|` `end` `_` `of` `_` `text` `|` `>`), so the model learns to write the literal out
  and generation does not stop there: `pipeline.training_examples` warns. For such a model set
  `eos_text` to its eos (`<|im_end|>`) or use the chat template.
- `chat`: the tokenizer's own chat template (LLaMA-3-Instruct, SmolLM2-Instruct): the prompt is
  exactly `tokenizer.apply_chat_template([{"role": "user", "content": query}],
  add_generation_prompt=True, tokenize=False)`, rendered per query, so whatever the template does
  to the message (LLaMA-3's `| trim`) happens here as at evaluation. Responses start right after
  it (no leading space) and end with the end-of-turn token the template writes after an assistant
  message (`<|eot_id|>`, `<|im_end|>`); `eos_text` does not apply. A harmful prefix sits inside the
  assistant turn: prompt + first words of r̂.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

BASE_PROMPT = "[INST] {query} [\\INST]"
# The official evaluation prompt (every test set except CompletionAttack, which is fed raw).
EVAL_PROMPT = "[INST] \n{question}\n\n [\\INST]"
OFFICIAL_EOS = "<|end_of_text|>"
_MARKER = "\u2063DERTA_RESPONSE\u2063"


@dataclasses.dataclass(frozen=True)
class Template:
    """How a query becomes a prompt and how a response continues it."""

    kind: str  # base | chat
    eos: str  # appended to every supervised text: base: eos_text; chat: the end-of-turn token
    render: Callable[[str], str] | None = None  # chat only: query -> the rendered prompt

    def __post_init__(self):
        if self.kind not in ("base", "chat"):
            raise ValueError(f"template kind={self.kind!r}: expected 'base' or 'chat'")
        if not self.eos:
            raise ValueError("eos_text is empty")
        if (self.render is None) != (self.kind == "base"):
            raise ValueError("a chat template needs `render` and a base template takes none")

    @property
    def lead(self) -> str:
        """What a response starts with after the prompt: a space (base) or nothing (chat)."""
        return " " if self.kind == "base" else ""

    def prompt(self, query: str) -> str:
        if self.kind == "base":
            return BASE_PROMPT.format(query=query)
        return self.render(query)

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


def base_template(eos_text: str = OFFICIAL_EOS) -> Template:
    return Template(kind="base", eos=eos_text)


def chat_template(tokenizer: Any) -> Template:
    """The tokenizer's chat template, rendered per query, with its end-of-turn token."""
    name = getattr(tokenizer, "name_or_path", "?")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {name!r} has no chat template")

    def render(query: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                             add_generation_prompt=True)

    if _MARKER not in render(_MARKER):
        raise ValueError(f"the chat template of {name!r} does not show the user's message")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARKER}], tokenize=False)
    tail = full.partition(_MARKER)[2]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        raise ValueError(
            f"cannot find the end-of-turn token after an assistant message in the chat template of "
            f"{name!r} (text after the message: {tail[:40]!r})")
    return Template(kind="chat", eos=tokenizer.decode([ids[0]]), render=render)


def make_template(kind: str, tokenizer: Any = None, eos_text: str = OFFICIAL_EOS) -> Template:
    """`base` (ending with `eos_text`) or `chat` (the tokenizer's; `eos_text` does not apply)."""
    if kind == "base":
        return base_template(eos_text)
    if kind == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer")
        return chat_template(tokenizer)
    raise ValueError(f"template={kind!r}: expected 'base' or 'chat'")
