"""Output-quality probe: held-out documents cut into a prompt and its reference continuation.

The probe sends each prompt to the live endpoint (greedy decoding) and scores the completion
against the reference with ROUGE-L F1 (longest common token subsequence) and the exact-prefix
match (how many of the reference's first tokens the completion reproduces, in order). Pure
functions over the tokenizer of ``drift.py``; the operator does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from statistics import fmean
from typing import Any

from llmops_provider.drift import tokens


def probe_items(texts: Iterable[str], prompt_words: int, reference_words: int, limit: int) -> list[dict[str, str]]:
    """``{prompt, reference}`` from documents long enough to hold both (in order, at most ``limit``)."""
    items = []
    for text in texts:
        words = text.split()
        if len(words) < prompt_words + reference_words:
            continue
        items.append(
            {
                "prompt": " ".join(words[:prompt_words]),
                "reference": " ".join(words[prompt_words : prompt_words + reference_words]),
            }
        )
        if len(items) >= limit:
            break
    return items


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word/punctuation tokens (0 when either side is empty)."""
    c, r = tokens(candidate), tokens(reference)
    lcs = _lcs(c, r) if c and r else 0
    if not lcs:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def prefix_match(candidate: str, reference: str, n: int = 4) -> float:
    """Share of the reference's first ``n`` tokens the candidate starts with, in order."""
    c, r = tokens(candidate), tokens(reference)[:n]
    if not r:
        return 0.0
    matched = 0
    for x, y in zip(c, r, strict=False):  # the candidate may be shorter or longer
        if x != y:
            break
        matched += 1
    return matched / len(r)


def score(items: list[dict[str, str]], completions: list[str]) -> dict[str, Any]:
    """Mean ROUGE-L and prefix match over the probe, plus the per-item scores."""
    rows = [
        {
            **item,
            "completion": text,
            "rouge_l": rouge_l(text, item["reference"]),
            "prefix_match": prefix_match(text, item["reference"]),
        }
        for item, text in zip(items, completions, strict=True)
    ]
    return {
        "n": len(rows),
        "rouge_l": fmean(r["rouge_l"] for r in rows) if rows else None,
        "prefix_match": fmean(r["prefix_match"] for r in rows) if rows else None,
        "items": rows,
    }
