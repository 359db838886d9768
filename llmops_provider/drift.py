"""Prompt drift: how far production prompts are from the text the model was trained on.

The measure is the Jensen-Shannon divergence (base 2, so 0 = same distribution, 1 = disjoint)
between token distributions, averaged over unigrams and bigrams. Tokens are lower-cased words
and single punctuation marks: no tokenizer download, and the same on every machine. Both
distributions are counted over the reference's most frequent n-grams plus one out-of-vocabulary
bucket, and smoothed (add-``alpha``) so an n-gram unseen on one side does not make it jump to 1.

Pure Python: runs in the monitor task of the control plane, no engine import.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

OOV = "<oov>"
_TOKEN = re.compile(r"[a-z0-9_]+|[^\sa-z0-9_]")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngram_counts(texts: Iterable[str], n: int) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        toks = tokens(text)
        counts.update(zip(*(toks[i:] for i in range(n)), strict=False) if n > 1 else toks)
    return counts


def js_divergence(p: Counter, q: Counter, alpha: float = 0.01) -> float:
    """Jensen-Shannon divergence (base 2) of two count tables, add-``alpha`` smoothed."""
    vocab = set(p) | set(q)
    if not vocab:
        return 0.0
    p_total = sum(p.values()) + alpha * len(vocab)
    q_total = sum(q.values()) + alpha * len(vocab)
    js = 0.0
    for token in vocab:
        pi = (p.get(token, 0) + alpha) / p_total
        qi = (q.get(token, 0) + alpha) / q_total
        mi = (pi + qi) / 2
        js += 0.5 * pi * math.log2(pi / mi) + 0.5 * qi * math.log2(qi / mi)
    return max(0.0, min(1.0, js))


def bucketed(counts: Counter, vocab: set) -> Counter:
    """``counts`` over ``vocab`` plus one out-of-vocabulary bucket."""
    out: Counter = Counter()
    for token, n in counts.items():
        out[token if token in vocab else OOV] += n
    return out


def prompt_drift(prompts: list[str], reference: list[str], vocab_size: int = 500) -> dict[str, float]:
    """``{unigram_js, bigram_js, js, oov_rate}`` of ``prompts`` against ``reference`` (``js`` = mean of both).

    Both sides are counted over the reference's ``vocab_size`` most frequent n-grams plus one
    out-of-vocabulary bucket: a small sample of in-distribution prompts then scores close to 0
    (the long tail of rare n-grams it happens not to contain does not count against it), while
    text from elsewhere piles its mass into the OOV bucket.
    """
    result: dict[str, float] = {}
    for n, key in ((1, "unigram_js"), (2, "bigram_js")):
        ref = ngram_counts(reference, n)
        vocab = {token for token, _ in ref.most_common(vocab_size)}
        sample = bucketed(ngram_counts(prompts, n), vocab)
        result[key] = js_divergence(sample, bucketed(ref, vocab))
        if n == 1:
            total = sum(sample.values())
            result["oov_rate"] = sample[OOV] / total if total else 0.0
    result["js"] = (result["unigram_js"] + result["bigram_js"]) / 2
    return result


def evaluate_drift(prompts: list[str], reference: list[str], max_js: float | None, min_prompts: int) -> dict[str, Any]:
    """``{status, js, ..., prompts, limit, reason}``; status ``drift``, ``ok`` or ``no-data``."""
    out: dict[str, Any] = {"prompts": len(prompts), "limit": max_js}
    if max_js is None:
        return {**out, "status": "off", "reason": "monitoring.drift.max_js_divergence is null: drift not checked"}
    if len(prompts) < min_prompts or not reference:
        return {
            **out,
            "status": "no-data",
            "reason": f"drift not evaluated: {len(prompts)} production prompts (< {min_prompts}) or no training text",
        }
    out.update(prompt_drift(prompts, reference))
    if out["js"] > max_js:
        return {
            **out,
            "status": "drift",
            "reason": f"prompt drift: JS divergence {out['js']:.3f} > {max_js:g} over {len(prompts)} prompts",
        }
    return {**out, "status": "ok", "reason": f"prompt drift {out['js']:.3f} <= {max_js:g}"}
