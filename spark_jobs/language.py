"""Language identification for a batch of documents at once: py3langid's model, vectorized.

py3langid (langid.py's naive Bayes over byte n-grams, model shipped in the wheel) walks a
DFA one byte at a time in Python: about 1 ms per 2,000-character sample, the most expensive
per-document step of the pipeline. Here the DFA advances every document of a batch one byte
per numpy step (a gather over the batch), so a batch of a thousand samples costs what a
few documents cost one at a time. The features, the scores and the decision are py3langid's
own (same model arrays, same encoding, same sublinear counts, same calibration and alias
folding): ``classify_batch`` answers what ``LanguageIdentifier.classify`` answers, which
``tests/unit/test_data_steps.py`` checks document by document.
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np

from spark_jobs import minhash

_MODEL = None


def model() -> BatchIdentifier:
    """The shipped model, loaded once per Python worker (~0.5 s)."""
    global _MODEL
    if _MODEL is None:
        from py3langid import langid

        _MODEL = BatchIdentifier(langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True))
    return _MODEL


def encode(text: str) -> bytes:
    """py3langid's encoding of a ``str`` sample: all-caps folded, NFC, UTF-8."""
    if text.isupper():
        text = text.lower()
    return unicodedata.normalize("NFC", text).encode("utf8", errors="surrogatepass")


class BatchIdentifier:
    def __init__(self, identifier) -> None:
        self.identifier = identifier  # the scalar reference, also used for odd inputs
        self.classes = list(identifier.nb_classes)
        self.nextmove = np.asarray(identifier.tk_nextmove, dtype=np.uint32)
        self.rowbase = np.asarray(identifier.tk_row, dtype=np.int64) << 8
        self.output = np.asarray(identifier.tk_output, dtype=np.int64)
        self.ptc = np.asarray(identifier.nb_ptc, dtype=np.float32)  # exact widening; float16 matmul is slow
        self.pc = identifier.nb_pc
        self.alias_pairs = list(identifier._alias_pairs)

    def classify_batch(self, texts: list[str], max_batch_bytes: int = 4 << 20) -> list[tuple[str, float]]:
        """``[(language, probability)]`` for ``texts``, as py3langid's ``classify`` with ``norm_probs``."""
        encoded = [encode(t) for t in texts]
        out: list[tuple[str, float]] = [("", 0.0)] * len(encoded)
        # similar lengths together: the walk runs as long as the longest sample of its group
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        start = 0
        while start < len(order):
            stop, width = start, 0
            while stop < len(order) and (stop - start + 1) * max(width, len(encoded[order[stop]])) <= max_batch_bytes:
                width = max(width, len(encoded[order[stop]]))
                stop += 1
            stop = max(stop, start + 1)
            group = order[start:stop]
            for i, result in zip(group, self._classify_group([encoded[i] for i in group]), strict=True):
                out[i] = result
            start = stop
        return out

    def _walk(self, samples: list[bytes]) -> np.ndarray:
        """DFA states after each byte: ``[width, len(samples)]`` (rows past a sample's end are padding)."""
        width = max(len(s) for s in samples)
        grid = np.zeros((len(samples), width), dtype=np.uint8)
        for row, s in enumerate(samples):
            grid[row, : len(s)] = np.frombuffer(s, dtype=np.uint8)
        columns = np.ascontiguousarray(grid.T).astype(np.int64)
        states = np.empty((width, len(samples)), dtype=np.int64)
        state = np.zeros(len(samples), dtype=np.int64)
        nextmove, rowbase = self.nextmove, self.rowbase
        for t in range(width):
            state = nextmove[rowbase[state] + columns[t]].astype(np.int64)
            states[t] = state
        return states

    def _classify_group(self, samples: list[bytes]) -> list[tuple[str, float]]:
        results = []
        states = self._walk(samples) if any(samples) else None
        for col, sample in enumerate(samples):
            feats = self.output[states[: len(sample), col]] if sample else np.empty(0, dtype=np.int64)
            feats = feats[feats >= 0]
            if feats.size:
                idx, counts = minhash.sorted_counts(feats)  # np.unique's answer, faster
                scores = np.log1p(counts.astype(np.float32)) @ self.ptc[idx] + self.pc
            else:  # no features: uniform, as py3langid answers under norm_probs
                scores = np.zeros(len(self.classes), dtype=np.float32)
            scores *= 1.0 / math.sqrt(len(sample) or 1)
            np.exp(scores - scores.max(), out=scores)
            scores /= scores.sum()
            for i, j in self.alias_pairs:
                scores[i] += scores[j]
                scores[j] = 0.0
            best = int(scores.argmax())
            results.append((self.classes[best], float(scores[best])))
        return results
