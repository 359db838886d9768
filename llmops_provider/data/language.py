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

_MODEL = None
CACHE_VERSION = 1  # bump when the cached arrays change


def model() -> BatchIdentifier:
    """The shipped model, loaded once per Python worker.

    py3langid decompresses its model (xz) on every load, ~0.6-0.9 s per Spark Python worker;
    the arrays this module needs are cached uncompressed per machine (``cache_path``, ~70 MB,
    written once, atomically) and then load in ~0.3 s. Without a writable cache directory the
    model loads from py3langid every time.
    """
    global _MODEL
    if _MODEL is None:
        path = cache_path()
        if path is not None and path.is_file():
            try:
                _MODEL = BatchIdentifier.load(path)
            except Exception:  # noqa: BLE001 - a damaged cache (truncated zip, missing array): rebuild it
                _MODEL = None
        if _MODEL is None:
            from py3langid import langid

            _MODEL = BatchIdentifier(langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True))
            if path is not None:
                _MODEL.save(path)
    return _MODEL


def cache_path():
    """Where this machine keeps the converted model (``$XDG_CACHE_HOME`` or ``~/.cache``), keyed by
    py3langid's version and the model file's size; None when no home directory is known."""
    import os
    from importlib.metadata import version
    from pathlib import Path

    try:
        from py3langid import langid

        model_file = Path(langid.__file__).parent / langid.MODEL_FILE
        key = f"{version('py3langid')}-{model_file.stat().st_size}-v{CACHE_VERSION}"
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (ImportError, OSError, RuntimeError):
        return None
    return base / "llmops" / f"py3langid-batch-{key}.npz"


def encode(text: str) -> bytes:
    """py3langid's encoding of a ``str`` sample: all-caps folded, NFC, UTF-8."""
    if text.isupper():
        text = text.lower()
    return unicodedata.normalize("NFC", text).encode("utf8", errors="surrogatepass")


def first_seen_counts(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``feats`` and their counts, in order of first occurrence.

    The order py3langid sums its features in (a ``Counter`` of the walk): the float32 dot
    product then adds the same terms in the same order, so the scores are py3langid's to the
    bit, on any CPU (sorted order gave answers a few float32 ulps away, and how many depended on
    the machine's BLAS kernels).
    """
    order = np.argsort(feats, kind="stable")  # stable: a group's first element is its first occurrence
    ranked = feats[order]
    first = np.empty(ranked.size, dtype=bool)
    first[0] = True
    np.not_equal(ranked[1:], ranked[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, ranked.size))
    seen = np.argsort(order[starts])
    return ranked[starts][seen], counts[seen]


class BatchIdentifier:
    def __init__(self, identifier=None, arrays: dict | None = None) -> None:
        """From py3langid's ``LanguageIdentifier``, or from the ``arrays`` :meth:`save` wrote."""
        if arrays is None:
            arrays = {
                "classes": np.asarray(list(identifier.nb_classes)),
                "nextmove": np.asarray(identifier.tk_nextmove, dtype=np.uint32),
                "row": np.asarray(identifier.tk_row, dtype=np.int64),
                "output": np.asarray(identifier.tk_output, dtype=np.int64),
                "ptc": np.asarray(identifier.nb_ptc),  # float16 as shipped
                "pc": np.asarray(identifier.nb_pc),
                "alias_pairs": np.asarray(list(identifier._alias_pairs), dtype=np.int64).reshape(-1, 2),
            }
        self.arrays = arrays
        self.classes = [str(c) for c in arrays["classes"]]
        self.nextmove = arrays["nextmove"]
        self.rowbase = arrays["row"] << 8
        self.output = arrays["output"]
        self.ptc = arrays["ptc"].astype(np.float32)  # exact widening; float16 matmul is slow
        self.pc = arrays["pc"]
        self.alias_pairs = [(int(i), int(j)) for i, j in arrays["alias_pairs"]]

    def save(self, path) -> None:
        """Write the arrays to ``path`` (a temporary sibling renamed into place); best effort."""
        import os

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.savez(fh, **self.arrays)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path) -> BatchIdentifier:
        with np.load(path, allow_pickle=False) as data:
            return cls(arrays={k: data[k] for k in data.files})

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
                idx, counts = first_seen_counts(feats)
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
