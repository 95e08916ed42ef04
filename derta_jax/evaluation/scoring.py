"""Helpfulness scores: GSM8K final-number exact match and MMLU option-letter accuracy."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number as people write it: optional sign, thousands commas, optional decimals.
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_REFERENCE_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
# Explicit final-answer markers, preferred over "the last number in the text".
_MARKED_RE = re.compile(r"(?:####|answer is|answer:)\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)


def _to_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def gsm8k_reference(answer: str) -> Decimal:
    """The number after `#### ` in a GSM8K reference answer, or the answer itself when it is
    just a number (e.g. "144")."""
    match = _REFERENCE_RE.search(answer)
    if match is None and re.fullmatch(_NUMBER, answer.strip()):
        return _to_decimal(answer.strip())
    value = _to_decimal(match.group(1)) if match else None
    if value is None:
        raise ValueError(f"GSM8K answer has no '#### <number>': {answer[-80:]!r}")
    return value


def gsm8k_prediction(response: str) -> Decimal | None:
    """The model's final number: the last `#### N` / `answer is N`, else the last number; None if
    the response has no number."""
    marked = _MARKED_RE.findall(response)
    candidates = marked or _NUMBER_RE.findall(response)
    for text in reversed(candidates):
        value = _to_decimal(text)
        if value is not None:
            return value
    return None


def gsm8k_correct(response: str, answer: str) -> bool:
    prediction = gsm8k_prediction(response)
    return prediction is not None and prediction == gsm8k_reference(answer)


_LETTER = "ABCD"
# "The answer is (B)", "answer: b", "Answer is B." (any case: the phrase anchors it).
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*(?:option\s*)?\(?([A-Da-d])\b\)?", re.IGNORECASE)
# The response opens with the option: "B", "B.", "(B) ...", "b)"; a lone lowercase letter must be
# wrapped ("a)" / "(a)") so that the article "a" is not read as option A.
_LEADING_RE = re.compile(r"^\s*(?:\(([A-Da-d])\)|([A-Da-d])[.):](?!\w)|([A-D])(?=\s|$))")
_PARENS_RE = re.compile(r"\(([A-D])\)")


def mmlu_reference(answer: str) -> str:
    """The reference letter: "B", "(B)" or "b"."""
    letter = answer.strip().strip("()").upper()
    if letter not in tuple(_LETTER):
        raise ValueError(f"MMLU answer must be one of A-D, got {answer!r}")
    return letter


def mmlu_prediction(response: str) -> str | None:
    """The chosen option letter, or None when the response names none."""
    for pattern in (_ANSWER_IS_RE, _LEADING_RE, _PARENS_RE):
        match = pattern.search(response)
        if match:
            return next(g for g in match.groups() if g).upper()
    return None


def mmlu_correct(response: str, answer: str) -> bool:
    return mmlu_prediction(response) == mmlu_reference(answer)
