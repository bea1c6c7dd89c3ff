"""Scoring: SQuAD exact match / F1 with the official v1.1 normalization, and GSM8K final numbers.

`normalize_answer`, `exact_match` and `f1` follow the official SQuAD v1.1 evaluation script
(lower case, drop punctuation, drop the articles a/an/the, collapse whitespace; F1 over the bag
of normalized tokens; the best score over the gold answers). `clean_prediction` is ours: it keeps
the first non-empty line of a generation and drops a leading "Answer:" so a chatty model is scored
on its answer; it is applied identically to every method.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from fractions import Fraction
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1: lower, remove punctuation, remove articles, fix whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def answer_key(s: str) -> str:
    """What an answer is compared by: its official normalization, or, for a one-letter answer that
    normalization erases (the option "A" is the article "a"), the letter itself. Empty for a text
    that says nothing ("", "The", "!!!"): such a gold answer is refused where items are loaded
    (pipeline/tasks/rows.py), since an empty reply would match it."""
    key = normalize_answer(s)
    if key:
        return key
    bare = "".join(ch for ch in s if ch not in _PUNCT).strip()
    return bare.lower() if len(bare) == 1 and bare.isalpha() else ""


def exact_match(prediction: str, truth: str) -> float:
    return float(answer_key(prediction) == answer_key(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = answer_key(prediction).split(), answer_key(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


_LEADS = re.compile(r"^\s*(?:final answer|the answer is|answer)\b\s*[:\-]?\s*", re.IGNORECASE)


def clean_prediction(text: str) -> str:
    """The first non-empty line, without a leading 'Answer:' (ours, not the official script)."""
    for line in text.splitlines():
        if line.strip():
            return _LEADS.sub("", line.strip(), count=1).strip()
    return ""


def squad_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction: the max over the gold answers, as the official script."""
    if not answers:
        raise ValueError("a SQuAD item needs at least one gold answer")
    pred = clean_prediction(prediction)
    return max(exact_match(pred, a) for a in answers), max(f1(pred, a) for a in answers)


def contains(prediction: str, answers: Sequence[str]) -> float:
    """Answer-contained accuracy: 1.0 when a gold answer's key appears, as whole words, in the
    whole normalized output (the papers' "accuracy" on the games). A one-letter answer is never
    found this way (normalization drops the article "a"): score those by option."""
    said = f" {normalize_answer(prediction)} "
    return float(any(f" {key} " in said for key in (normalize_answer(a) for a in answers) if key))


# every score a text-answer task can record; `evaluate.<task>.primary` picks the one reported first
SCORES = {"em": "exact match (SQuAD v1.1 normalization, best over the gold answers)",
          "f1": "token F1 (SQuAD v1.1, best over the gold answers)",
          "contains": "answer-contained accuracy (a normalized gold answer appears in the output)",
          "option": "option accuracy (the option the reply names first is the gold one; tasks with options)",
          "accuracy": "the final number equals the gold number (GSM8K)"}


# --- GSM8K ---------------------------------------------------------------------------------------

# a number: thousands groups (1,234,567.5) or plain digits with optional decimals; sign kept apart
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(rf"(-)?\s?\$?\s?({_NUM})")
_MARKERS = [
    re.compile(rf"####\s*(-)?\s?\$?\s?({_NUM})"),
    re.compile(rf"\\boxed\{{\s*(-)?\s?\\?\$?\s?({_NUM})"),
    re.compile(rf"(?:final answer|answer)\s*(?:is|:|=)?\s*:?\s*\**\s*(-)?\s?\$?\s?({_NUM})", re.IGNORECASE),
]


def parse_number(text: str) -> Fraction | None:
    """A number string ('1,234', '-3.50', '$12', '7.') as an exact Fraction; None if it is not one."""
    m = re.fullmatch(rf"\s*(-)?\s?\$?\s?({_NUM})\.?\s*", text.strip().rstrip("."))
    if not m:
        return None
    value = Fraction(m.group(2).replace(",", ""))
    return -value if m.group(1) else value


def extract_number(text: str) -> Fraction | None:
    """The final answer of a GSM8K-style solution: '#### N', then \\boxed{N}, then the last
    'answer is/Answer: N' (when N starts an equation on its line, 'Answer: 10 - 4 = 6', the number
    after the line's last '='), then the last number anywhere; None when the text holds no number."""
    for pattern in _MARKERS:
        found = list(pattern.finditer(text))
        if found:
            m = found[-1]
            eol = text.find("\n", m.end())
            rest = text[m.end():eol if eol >= 0 else len(text)]
            if "=" in rest:  # "Answer: 10 - 4 = 6": the result of the line's last equation
                after = _NUMBER.findall(rest.rsplit("=", 1)[1])
                if after:
                    return _to_fraction(*after[0])
            return _to_fraction(*m.groups())
    found = _NUMBER.findall(text)
    if not found:
        return None
    sign, digits = found[-1]
    return _to_fraction(sign, digits)


def _to_fraction(sign: str, digits: str) -> Fraction:
    value = Fraction(digits.replace(",", ""))
    return -value if sign else value


def gsm8k_correct(prediction: str, answer: str) -> float:
    """1.0 when the prediction's final number equals the gold number exactly, else 0.0."""
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} is not a number")
    pred = extract_number(prediction)
    return float(pred is not None and pred == gold)
