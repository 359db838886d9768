"""Prompt drift on real text: the project's corpus vs Debian's copyright files on this machine."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmops_provider.drift import evaluate_drift, js_divergence, ngram_counts, prompt_drift, tokens

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def corpus(name: str) -> list[str]:
    texts = []
    for line in (ROOT / "data" / "sample" / name).read_text().splitlines():
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            continue  # malformed on purpose
    return [t for t in texts if isinstance(t, str) and len(t) >= 40]


def copyright_paragraphs() -> list[str]:
    """License and copyright prose that every Debian system ships (/usr/share/doc/*/copyright)."""
    paragraphs = []
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        paragraphs += [p.strip() for p in path.read_text(errors="replace").split("\n\n") if len(p.strip()) >= 40]
    if len(paragraphs) < 200:
        pytest.fail(f"only {len(paragraphs)} paragraphs in /usr/share/doc/*/copyright: is this a Debian image?")
    return paragraphs


def as_prompts(texts: list[str]) -> list[str]:
    return [" ".join(t.split()[:12]) for t in texts]  # prompts are short: the first dozen words


@pytest.fixture(scope="module")
def data():
    return corpus("batch-001.jsonl"), corpus("batch-002.jsonl"), copyright_paragraphs()


def test_shifted_prompts_are_separated_from_in_distribution(data):
    train, held_out, shifted = data
    limit = 0.2  # the recipe default (monitoring.drift.max_js_divergence)
    # 80 prompts per draw: with 40, one draw of the shifted set (which grows with every Debian
    # package installed, /usr/share/doc/*/copyright) came out at 0.198 on a machine with Chromium
    for seed in range(5):
        rnd = random.Random(seed)
        same = evaluate_drift(as_prompts(rnd.sample(held_out, 80)), train, limit, min_prompts=30)
        other = evaluate_drift(as_prompts(rnd.sample(shifted, 80)), train, limit, min_prompts=30)
        assert same["status"] == "ok", same
        assert other["status"] == "drift", other
        assert other["js"] > same["js"] + 0.04
        assert other["oov_rate"] > same["oov_rate"] + 0.1
        assert "JS divergence" in other["reason"]


def test_identical_is_zero_and_disjoint_is_high():
    texts = ["return a list of threads", "open the file and read it"]
    assert prompt_drift(texts, texts)["js"] == pytest.approx(0.0, abs=1e-12)
    far = prompt_drift(["zzz qqq www"] * 5, texts)
    assert far["js"] > 0.5 and far["oov_rate"] == 1.0


def test_js_divergence_is_symmetric_and_bounded():
    p, q = ngram_counts(["a b c a"], 1), ngram_counts(["c d e"], 1)
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert 0 < js_divergence(p, q) <= 1
    assert ngram_counts(["a b c"], 2) == {("a", "b"): 1, ("b", "c"): 1}
    assert tokens("Return x.y()!") == ["return", "x", ".", "y", "(", ")", "!"]


def test_too_few_prompts_or_off_is_not_drift():
    assert evaluate_drift(["a"] * 3, ["b"], 0.2, min_prompts=30)["status"] == "no-data"
    assert evaluate_drift(["a"] * 50, [], 0.2, min_prompts=30)["status"] == "no-data"
    assert evaluate_drift(["a"] * 50, ["b"], None, min_prompts=30)["status"] == "off"
