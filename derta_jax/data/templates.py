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

Multi-turn rows (`messages`, chat template only; `conversation`): the prompt is the template's
rendering of the whole conversation before the last assistant turn, with the generation prompt,
so the last turn (a helpful response, or the harmful prefix and the safe or RTO response) continues
it as above. With `all_turns` the earlier assistant turns carry loss too: each one's span (its
content and end-of-turn token, what the model must write) is found by rendering the conversation
up to the turn with the generation prompt and up to its end without, and diffing. A template that
does not keep an earlier rendering as a prefix of a later one, or that renders an assistant turn
empty, is an error showing the rendered text.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jinja2

BASE_PROMPT = "[INST] {query} [\\INST]"
# The official evaluation prompt (every test set except CompletionAttack, which is fed raw).
EVAL_PROMPT = "[INST] \n{question}\n\n [\\INST]"
OFFICIAL_EOS = "<|end_of_text|>"
ASSISTANT_TURNS = ("all", "last")
_MARKER = "\u2063DERTA_RESPONSE\u2063"


@dataclasses.dataclass(frozen=True)
class Template:
    """How a query becomes a prompt and how a response continues it."""

    kind: str  # base | chat
    eos: str  # appended to every supervised text: base: eos_text; chat: the end-of-turn token
    # chat only: (messages, add_generation_prompt) -> text, as apply_chat_template(tokenize=False)
    render: Callable[[list[dict[str, str]], bool], str] | None = None
    all_turns: bool = True  # conversations: earlier assistant turns carry loss too (else the last only)

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
        return self.render([{"role": "user", "content": query}], True)

    def conversation(self, messages: list[dict[str, str]]) -> tuple[str, tuple[tuple[int, int], ...]]:
        """The prompt of the assistant turn after `messages` (which end with a user turn), and the
        character spans in it of the earlier assistant turns that carry loss (see the module
        docstring); ValueError showing the rendered text if the template does not allow them."""
        if self.kind == "base":
            raise ValueError("multi-turn rows (messages) need the chat template (data.template=chat)")
        prompt = self.render(messages, True)
        spans = []
        for a in (i for i, m in enumerate(messages) if self.all_turns and m["role"] == "assistant"):
            before, turn = self.render(messages[:a], True), self.render(messages[:a + 1], False)
            end = turn.find(self.eos, len(before)) + len(self.eos)
            if not turn.startswith(before) or end < len(self.eos) or not prompt.startswith(turn[:end]):
                raise ValueError(
                    f"the chat template is not prefix-stable at message {a} (assistant): the "
                    f"conversation up to it renders as {before!r}, up to its end as {turn!r}, the "
                    f"whole prompt as {prompt!r}; train on the last turn only (data.assistant_turns=last)")
            if not turn[len(before):end - len(self.eos)].strip():
                raise ValueError(f"message {a} (assistant) renders empty, so its loss mask is empty: "
                                 f"{turn!r}")
            spans.append((len(before), end))
        return prompt, tuple(spans)

    def response(self, text: str) -> str:
        """A supervised text: lead + response + eos."""
        return self.lead + text + self.eos

    def harmful_prefix(self, prompt: str, words: list[str], i: int) -> tuple[str, str]:
        """The prompt with the first `i` words of r̂, and the lead of the text that follows it.

        Base (official, literal): `prompt + " " + " ".join(words[:i])`, so i = 0 leaves a trailing
        space, and the safe text still starts with a space. Chat: the words follow the generation
        prompt directly; the safe text starts with a space only when words precede it.
        """
        joined = " ".join(words[:i])
        if self.kind == "base":
            return prompt + " " + joined, " "
        return prompt + joined, (" " if i > 0 else "")


def base_template(eos_text: str = OFFICIAL_EOS) -> Template:
    return Template(kind="base", eos=eos_text)


def chat_template(tokenizer: Any, all_turns: bool = True) -> Template:
    """The tokenizer's chat template, rendered per example, with its end-of-turn token."""
    name = getattr(tokenizer, "name_or_path", "?")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {name!r} has no chat template")

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # e.g. "roles must alternate user/assistant"
            raise ValueError(f"the chat template of {name!r} refuses the conversation: {e}") from None

    if _MARKER not in render([{"role": "user", "content": _MARKER}], True):
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
    return Template(kind="chat", eos=tokenizer.decode([ids[0]]), render=render, all_turns=all_turns)


def make_template(kind: str, tokenizer: Any = None, eos_text: str = OFFICIAL_EOS,
                  assistant_turns: str = "all") -> Template:
    """`base` (ending with `eos_text`) or `chat` (the tokenizer's; `eos_text` does not apply).

    `assistant_turns`: all | last, the assistant turns of a conversation that carry loss."""
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns={assistant_turns!r}: expected one of {ASSISTANT_TURNS}")
    if kind == "base":
        return base_template(eos_text)
    if kind == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer")
        return chat_template(tokenizer, assistant_turns == "all")
    raise ValueError(f"template={kind!r}: expected 'base' or 'chat'")
