"""The refusal token: a configured string (default `Sorry`) that must be exactly one token id."""
from __future__ import annotations

from typing import Any

DEFAULT_REFUSAL = "Sorry"


def refusal_token_id(tokenizer: Any, token: str = DEFAULT_REFUSAL) -> int:
    """The single id of `token` (encoded without special tokens); ValueError otherwise.

    LLaMA-3: `Sorry` -> 19701 (the id the official code hard-codes); SmolLM2: `Sorry` -> 37388.
    """
    if not isinstance(token, str) or not token:
        raise ValueError(f"refusal token must be a non-empty string, got {token!r}")
    ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"refusal token {token!r} is {len(ids)} tokens {ids} with tokenizer {name!r}, expected "
            f"exactly one; choose a string the tokenizer keeps whole (e.g. 'Sorry' without a space)")
    return int(ids[0])
