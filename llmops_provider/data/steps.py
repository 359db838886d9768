"""The per-document steps of the data pipeline: small, composable, configured from the recipe.

A step sees one document and answers ``None`` (keep, possibly after changing ``doc.text``)
or ``(reason, detail)`` (drop: the document goes to the exclusion output with the step's
name, the reason and the detail). Parsing comes first and quarantines malformed lines.
No Spark here: the Spark job maps these over partitions, and tests call them directly.
A new filter is one small class with ``name`` and ``__call__``, listed in ``build_steps``.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmops_provider.data import minhash

# quarantine reasons (step "parse"): the line is not a usable record
PARSE_REASONS = (
    "invalid_utf8",  # the line's bytes are not UTF-8
    "record_too_large",  # longer than data.max_record_bytes
    "invalid_json",  # does not parse as JSON
    "not_an_object",  # valid JSON, but not a {...} record
    "missing_text",  # no text field, or it is null
    "text_not_string",  # the text field is a number, list, ...
    "bad_id",  # the id field is a list/object/bool
    "invalid_unicode",  # the text or id escapes a lone surrogate (\ud800-\udfff): not a character
)

Drop = tuple[str, str | None]


@dataclass
class Doc:
    id: str
    text: str
    source: str
    modified: list[str] = field(default_factory=list)
    _words: tuple | None = field(default=None, repr=False)

    def words(self) -> tuple[np.ndarray, np.ndarray]:
        """(32-bit word hashes, word lengths in bytes) of the current text, computed once per text."""
        if self._words is None or self._words[0] is not self.text:
            hashes, starts, ends = minhash.word_hashes_spans(self.text)
            self._words = (self.text, hashes, (ends - starts).astype(np.int64))
        return self._words[1], self._words[2]


# --------------------------------------------------------------------------- parse


def parse_line(raw: bytes, source: str, text_field: str, id_field: str | None, max_bytes: int):
    """Raw line bytes -> ``(Doc, None)`` or ``(None, reason)`` with a reason from PARSE_REASONS.

    The id is the record's own (stringified) or, when absent, one derived from the text
    after normalization (see ``assign_id``).
    """
    if len(raw) > max_bytes:
        return None, "record_too_large"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        record = json.loads(line)
    except ValueError:
        return None, "invalid_json"
    if not isinstance(record, dict):
        return None, "not_an_object"
    text = record.get(text_field)
    if text is None:
        return None, "missing_text"
    if not isinstance(text, str):
        return None, "text_not_string"
    raw_id = record.get(id_field) if id_field else None
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float, type(None))):
        return None, "bad_id"
    doc_id = str(raw_id) if raw_id is not None and str(raw_id).strip() else ""
    if "\\u" in line:  # only a JSON escape can make a lone surrogate: the line itself is valid UTF-8
        try:
            text.encode("utf-8")
            doc_id.encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid_unicode"
    return Doc(doc_id, text, source), None


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- transforms

# Cc controls except \t and \n; \r is folded into \n before this runs.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_RUNS = re.compile(r"\n\n\n+")


def normalize(text: str) -> str:
    """NFC, no control characters, whitespace collapsed within lines, at most one blank line."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    # per line: runs of (Unicode) whitespace -> one space, none at either end; str.split is
    # C-speed where a regex substitution visits every space
    text = "\n".join([" ".join(line.split()) for line in text.split("\n")])
    return _BLANK_RUNS.sub("\n\n", text).strip()


class Normalize:
    name = "normalize"

    def __call__(self, doc: Doc) -> Drop | None:
        doc.text = normalize(doc.text)
        return None


# Patterns that could start anywhere begin with a character class and check what precedes it
# with a lookbehind after that first character: re then skips quickly to the positions where
# that class matches instead of trying the pattern at every position (about 2x faster, same
# matches; ``(?<![\d.])\d`` is written ``\d(?<![\d.]\d)``).
_IPV4 = re.compile(r"\d(?<![\d.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\d.]*\d)")


def _ipv4(match: re.Match) -> str:
    return "<IP>" if all(int(o) <= 255 for o in match.group().split(".")) else match.group()


_ASSIGNED = {
    word: re.compile(rest)
    for word, rest in (
        ("key", r"\s*[:=]"),
        ("secret", r"\s*[:=]"),
        ("token", r"\s*[:=]"),
        ("passw", r"(?:or)?d\s*[:=]"),
    )
}


def _assignment_hint(text: str) -> bool:
    """Whether ``key``/``secret``/``token``/``passw(or)d``, in any case, is followed by ``:`` or ``=``:
    true for every match of the secret-assignment pattern (casefold, like ``re``'s ignore-case,
    equates \u212a with k and \u017f with s), found by ``str.find`` instead of a regex at every letter."""
    low = text.lower() if text.isascii() else text.casefold()
    for word, rest in _ASSIGNED.items():
        at = low.find(word)
        while at >= 0:
            if rest.match(low, at + len(word)):
                return True
            at = low.find(word, at + 1)
    return False


# (kind, hint, pattern, replacement); keys first: a token can contain what looks like an e-mail
# or a number. The hint is a cheap necessary condition checked before the substitution: a tuple
# of substrings of which one must occur, a pattern that every match of ``pattern`` contains and
# that ``re`` finds fast (it starts with a literal or a rare character), or a function. Most
# documents fail most hints, and a failed hint spares the costlier scan of the pattern.
PII_PATTERNS: list[tuple[str, Any, re.Pattern, Any]] = [
    (
        "key",
        ("PRIVATE KEY",),
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
        "<PRIVATE_KEY>",
    ),
    ("key", re.compile(r"A[KS]IA[0-9A-Z]{16}"), re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "<KEY>"),
    ("key", re.compile(r"gh[pousr]_"), re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), "<KEY>"),
    ("key", ("xox",), re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"), "<KEY>"),
    ("key", ("sk-",), re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"), "<KEY>"),
    ("key", ("eyJ",), re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"), "<KEY>"),
    (
        "key",
        _assignment_hint,
        re.compile(
            # \b(api_key|access_key|secret|token|password)\s*[:=]\s*['"]?VALUE, case-insensitive
            r"(?i)([apst](?<!\w[apst])(?:(?<=a)(?:pi[_-]?key|ccess[_-]?key)|(?<=s)ecret|(?<=t)oken|(?<=p)assw(?:or)?d)"
            r"\s*[:=]\s*['\"]?)[A-Za-z0-9_\-/+=.]{12,}"
        ),
        r"\1<KEY>",
    ),
    ("email", ("@",), re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    ("ip", re.compile(r"\.\d{1,3}\.\d{1,3}\.\d"), _IPV4, _ipv4),
    (
        "ip",
        re.compile(r":(?:[0-9a-fA-F]{1,4}:){6}[0-9a-fA-F]"),
        re.compile(r"[0-9a-fA-F](?<!\w[0-9a-fA-F])[0-9a-fA-F]{0,3}:(?:[0-9a-fA-F]{1,4}:){6}[0-9a-fA-F]{1,4}\b"),
        "<IP>",
    ),
    (
        "phone",
        # every match ends in 3-4 digits, a separator and 3-4 digits
        re.compile(r"\d{3}[ .-]\d{3}"),
        # (?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])
        re.compile(
            r"[+(\d](?<![\w+][+(\d])(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])|(?<=\()\d{2,4}\)[ .-]?"
            r"|(?<=\d)\d{1,3}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])"
        ),
        "<PHONE>",
    ),
]


class RedactPII:
    """Redacts e-mails, IPs, phone numbers and keys; runs after the filters (on the documents
    they keep), so no time goes into redacting a document that is then dropped."""

    name = "pii"

    def __init__(self, kinds: list[str]) -> None:
        self.patterns = [(h, p, r) for kind, h, p, r in PII_PATTERNS if kind in kinds]

    def __call__(self, doc: Doc) -> Drop | None:
        text = doc.text
        for hint, pattern, replacement in self.patterns:
            if isinstance(hint, tuple):
                if not any(map(text.__contains__, hint)):  # C-level scan, no generator frame per substring
                    continue
            elif isinstance(hint, re.Pattern):
                if hint.search(text) is None:
                    continue
            elif not hint(text):
                continue
            text = pattern.sub(replacement, text)
        doc.text = text
        return None


# --------------------------------------------------------------------------- filters


class Length:
    name = "length"

    def __init__(self, min_chars: int, max_chars: int) -> None:
        self.min_chars, self.max_chars = min_chars, max_chars

    def __call__(self, doc: Doc) -> Drop | None:
        if len(doc.text) < self.min_chars:
            return "text_too_short", f"{len(doc.text)} < {self.min_chars} chars"
        if len(doc.text) > self.max_chars:
            return "text_too_long", f"{len(doc.text)} > {self.max_chars} chars"
        return None


class Language:
    """py3langid's naive Bayes model (shipped in its wheel), run over a batch of documents at
    once (:mod:`llmops_provider.data.language`); the score is its calibrated probability."""

    name = "language"

    def __init__(self, languages: list[str], min_score: float, sample_chars: int) -> None:
        self.languages, self.min_score, self.sample_chars = set(languages), min_score, sample_chars

    def __call__(self, doc: Doc) -> Drop | None:
        return self.batch([doc])[0]

    def batch(self, docs: list[Doc]) -> list[Drop | None]:
        from llmops_provider.data import language

        if not self.languages:  # [] keeps every language: nothing to decide
            return [None] * len(docs)
        found = language.model().classify_batch([d.text[: self.sample_chars] for d in docs])
        return [self._decide(lang, score) for lang, score in found]

    def _decide(self, lang: str, score: float) -> Drop | None:
        if not self.languages:
            return None
        if lang not in self.languages:
            return "language_not_allowed", f"{lang} ({score:.2f})"
        if score < self.min_score:
            return "language_low_confidence", f"{lang} ({score:.2f}) < {self.min_score}"
        return None


_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_NON_ALPHA_WORD = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")
_BULLETS = ("-", "*", "\u2022", "\u2023", "\u25cf", "\u25e6", "\u2013")
_ELLIPSIS = ("...", "\u2026")


class GopherQuality:
    name = "gopher_quality"

    def __init__(self, spec) -> None:
        self.s = spec

    def __call__(self, doc: Doc) -> Drop | None:
        s, text = self.s, doc.text
        words = text.split()
        n = len(words)
        if n < s.min_words:
            return "gopher_below_min_words", f"{n} < {s.min_words}"
        if n > s.max_words:
            return "gopher_above_max_words", f"{n} > {s.max_words}"
        avg = sum(map(len, words)) / n
        if avg < s.min_avg_word_length:
            return "gopher_below_avg_word_length", f"{avg:.2f} < {s.min_avg_word_length}"
        if avg > s.max_avg_word_length:
            return "gopher_above_avg_word_length", f"{avg:.2f} > {s.max_avg_word_length}"
        symbols = (text.count("#") + text.count("...") + text.count("\u2026")) / n
        if symbols > s.max_symbol_word_ratio:
            return "gopher_symbol_word_ratio", f"{symbols:.3f} > {s.max_symbol_word_ratio}"
        lines = [line for line in text.split("\n") if line.strip()]
        bullets = sum(line.lstrip().startswith(_BULLETS) for line in lines) / max(1, len(lines))
        if bullets > s.max_bullet_lines_ratio:
            return "gopher_bullet_lines", f"{bullets:.2f} > {s.max_bullet_lines_ratio}"
        ellipsis = sum(line.rstrip().endswith(_ELLIPSIS) for line in lines) / max(1, len(lines))
        if ellipsis > s.max_ellipsis_lines_ratio:
            return "gopher_ellipsis_lines", f"{ellipsis:.2f} > {s.max_ellipsis_lines_ratio}"
        alpha = 1 - len(_NON_ALPHA_WORD.findall(text)) / n
        if alpha < s.min_alpha_words_ratio:
            return "gopher_alpha_words", f"{alpha:.2f} < {s.min_alpha_words_ratio}"
        if s.min_stop_words:
            found = 0
            for w in words:
                if w.lower() in _STOP_WORDS:
                    found += 1
                    if found >= s.min_stop_words:
                        break
            if found < s.min_stop_words:
                return "gopher_stop_words", f"{found} < {s.min_stop_words}"
        return None


def _dup_ratios(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier one, fraction of their characters)."""
    if len(set(parts)) == len(parts):  # no repeats (the common case), found at C speed
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for p in parts:
        total_chars += len(p)
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / max(1, len(parts)), dup_chars / max(1, total_chars)


class GopherRepetition:
    """Gopher's repetition rules; the n-gram rules run vectorized over word hashes.

    Top n-gram ratio: characters of the most frequent n-gram times its count over all word
    characters. Duplicate n-gram ratio: characters of the words covered by a repeated
    (not first) occurrence of an n-gram over all word characters.
    """

    name = "gopher_repetition"

    def __init__(self, spec) -> None:
        self.s = spec

    def __call__(self, doc: Doc) -> Drop | None:
        s, text = self.s, doc.text
        # str.split when no run of 3+ newlines (always, after normalize) splits as the regex does
        parts = re.split(r"\n{2,}", text) if "\n\n\n" in text else text.split("\n\n")
        paragraphs = [p for p in parts if p.strip()]
        ratio, chars = _dup_ratios(paragraphs)
        if ratio > s.max_dup_para_ratio:
            return "gopher_dup_paragraphs", f"{ratio:.2f} > {s.max_dup_para_ratio}"
        if chars > s.max_dup_para_char_ratio:
            return "gopher_dup_paragraph_chars", f"{chars:.2f} > {s.max_dup_para_char_ratio}"
        lines = [line for line in text.split("\n") if line.strip()]
        ratio, chars = _dup_ratios(lines)
        if ratio > s.max_dup_line_ratio:
            return "gopher_dup_lines", f"{ratio:.2f} > {s.max_dup_line_ratio}"
        if chars > s.max_dup_line_char_ratio:
            return "gopher_dup_line_chars", f"{chars:.2f} > {s.max_dup_line_char_ratio}"
        words, lengths = doc.words()
        total = int(lengths.sum())
        if total == 0:
            return None
        cum = np.concatenate(([0], np.cumsum(lengths)))
        for n, grams in minhash.ngram_hash_series(words, s.max_top_ngram_char_ratio):
            count, p = minhash.top_repeat(grams)  # ties: the smallest hash, as np.unique orders them
            if count < 2:
                continue
            ratio = count * int(cum[p + n] - cum[p]) / total
            limit = s.max_top_ngram_char_ratio[n]
            if ratio > limit:
                return f"gopher_top_{n}_gram", f"{ratio:.3f} > {limit}"
        dup_limits = s.max_dup_ngram_char_ratio
        for n, grams in minhash.ngram_hash_series(words, dup_limits):
            starts, counts, positions = minhash.repeats(grams)
            later = np.ones(grams.size, dtype=bool)
            later[starts] = False  # every occurrence but the first of its value
            pos = positions[later]
            if pos.size == 0:
                return None  # no repeated n-gram: no longer one repeats either
            cover = np.zeros(words.size + 1, dtype=np.int64)
            cover[pos] += 1  # positions are distinct: plain indexing adds once each
            cover[pos + n] -= 1
            ratio = int(lengths[np.cumsum(cover[:-1]) > 0].sum()) / total
            limit = dup_limits[n]
            if ratio > limit:
                return f"gopher_dup_{n}_gram", f"{ratio:.3f} > {limit}"
            # a repeated (n+1)-gram starts a repeated n-gram and is covered by two of them, so the
            # ratio never grows with n: once it is within every larger n's limit, none can fail
            if all(ratio <= lim for m, lim in dup_limits.items() if m > n):
                return None
        return None


_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019", ":", ";", ")")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4:
    """C4's rules: drop lines without terminal punctuation / too few words / javascript /
    policy boilerplate (the text changes); drop documents with lorem ipsum, a curly
    bracket, too-long words or too few sentences left."""

    name = "c4"

    def __init__(self, spec) -> None:
        self.s = spec

    def __call__(self, doc: Doc) -> Drop | None:
        s = self.s
        low = doc.text.lower()
        if s.filter_lorem_ipsum and "lorem ipsum" in low:
            return "c4_lorem_ipsum", None
        if s.filter_curly_bracket and "{" in doc.text:
            return "c4_curly_bracket", None
        kept = []
        for line in doc.text.split("\n"):
            stripped = line.strip()
            if not stripped:
                continue
            words = stripped.split()
            if max(map(len, words)) > s.max_word_length:
                return "c4_long_word", f"> {s.max_word_length} chars"
            lower = stripped.lower()
            if s.filter_no_terminal_punct and not stripped.endswith(_TERMINAL):
                continue
            if len(words) < s.min_words_per_line:
                continue
            if s.filter_javascript and "javascript" in lower:
                continue
            if s.filter_policy and any(p in lower for p in _POLICY):
                continue
            kept.append(stripped)
        text = "\n".join(kept)
        sentences = len(_SENTENCE_END.findall(text))
        if sentences < s.min_sentences:
            return "c4_too_few_sentences", f"{sentences} < {s.min_sentences}"
        doc.text = text
        return None


class FineWeb:
    name = "fineweb"

    def __init__(self, spec) -> None:
        self.s = spec

    def __call__(self, doc: Doc) -> Drop | None:
        s, text = self.s, doc.text
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if not lines:
            return "fineweb_empty", None
        punct = sum(line.endswith(_TERMINAL) for line in lines) / len(lines)
        if punct < s.min_line_punct_ratio:
            return "fineweb_line_punct_ratio", f"{punct:.2f} < {s.min_line_punct_ratio}"
        short = sum(len(line) <= s.short_line_chars for line in lines) / len(lines)
        if short > s.max_short_line_ratio:
            return "fineweb_short_line_ratio", f"{short:.2f} > {s.max_short_line_ratio}"
        _, dup_chars = _dup_ratios(lines)
        if dup_chars > s.max_dup_line_char_ratio:
            return "fineweb_dup_line_chars", f"{dup_chars:.2f} > {s.max_dup_line_char_ratio}"
        ratio = text.count("\n") / max(1, len(text.split()))
        if ratio > s.max_newline_word_ratio:
            return "fineweb_newline_ratio", f"{ratio:.2f} > {s.max_newline_word_ratio}"
        return None


class Blocklist:
    name = "blocklist"

    def __init__(self, terms: list[str], max_hits: int) -> None:
        alternatives = "|".join(re.escape(t.strip().lower()) for t in sorted(set(terms)) if t.strip())
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)") if alternatives else None
        self.max_hits = max_hits

    def __call__(self, doc: Doc) -> Drop | None:
        if self.pattern is None:
            return None
        hits = self.pattern.findall(doc.text.lower())
        if len(hits) > self.max_hits:
            return "blocklisted", f"{len(hits)} hits, e.g. {sorted(set(hits))[:3]}"
        return None


def blocklist_terms(spec, home: str | None = None) -> list[str]:
    terms = list(spec.terms)
    if spec.path:
        path = Path(spec.path.replace("{home}", home or "")).expanduser()
        if not path.is_file():
            raise SystemExit(f"data.blocklist.path {spec.path}: no such file; give a file with one term per line")
        terms += [
            t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip() and not t.startswith("#")
        ]
    return terms


def build_steps(data, home: str | None = None) -> list:
    """The recipe's document steps, in pipeline order (dedup and split run on the whole set)."""
    steps: list = [Normalize(), Length(data.min_chars, data.max_chars)]
    if data.language.enabled:
        steps.append(Language(data.language.languages, data.language.min_score, data.language.sample_chars))
    q = data.quality
    for spec, cls in (
        (q.gopher_quality, GopherQuality),
        (q.gopher_repetition, GopherRepetition),
        (q.c4, C4),
        (q.fineweb, FineWeb),
    ):
        if spec.enabled:
            steps.append(cls(spec))
    terms = blocklist_terms(data.blocklist, home)
    if terms:
        steps.append(Blocklist(terms, data.blocklist.max_hits))
    # redaction last, as in FineWeb: it changes only what is kept, so it runs only on what the
    # filters kept (about half the documents of a web or documentation crawl)
    if data.pii.enabled and data.pii.kinds:
        steps.append(RedactPII(data.pii.kinds))
    return steps


def run_steps(doc: Doc, steps: list) -> tuple[str, str, str | None] | None:
    """Apply ``steps`` in order; ``(step, reason, detail)`` of the first drop, else None."""
    return run_steps_batch([doc], steps)[0]


def run_steps_batch(docs: list[Doc], steps: list) -> list[tuple[str, str, str | None] | None]:
    """``run_steps`` over many documents: each step sees all the documents still in, at once
    when it has a ``batch`` method (same answers as one at a time, fewer Python-level calls)."""
    results: list[tuple[str, str, str | None] | None] = [None] * len(docs)
    alive = list(range(len(docs)))
    for step in steps:
        if not alive:
            break
        before = [docs[i].text for i in alive]
        batch = getattr(step, "batch", None)
        drops = batch([docs[i] for i in alive]) if batch else [step(docs[i]) for i in alive]
        still = []
        for i, text, dropped in zip(alive, before, drops, strict=True):
            if dropped is not None:
                results[i] = (step.name, dropped[0], dropped[1])
                continue
            if docs[i].text != text:
                docs[i].modified.append(step.name)
            still.append(i)
        alive = still
    return results


def assign_id(doc: Doc) -> None:
    """Records without an id get one from their (final) content: stable across runs."""
    if not doc.id:
        doc.id = f"doc-{content_hash(doc.text)[:16]}"


def step_names(steps: list, data) -> list[str]:
    """Every step that can drop or change a document, in pipeline order (the stats' order)."""
    names = ["parse", *(s.name for s in steps)]
    if data.dedup == "exact":
        names.append("exact_dedup")
    if data.near_dedup.enabled:
        names.append("near_dedup")
    return [*names, "ids"]
