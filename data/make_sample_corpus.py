"""Build the demo corpus from real text that ships with Python: the standard library's docstrings.

No dataset hub is reachable, so the sample data is real English prose from the interpreter's own
modules. Batch 1 is the initial corpus; batch 2 is "new data" that lands later and triggers the
feedback loop. A few malformed lines and duplicates are injected on purpose so the data stage's
quarantine and dedup are exercised by the demo. Output is deterministic for a given Python version.

    python data/make_sample_corpus.py data/sample
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from pathlib import Path

MODULES = sorted(
    m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith("python3.11") and not m.name.startswith("_")
)
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "turtledemo",
    "tkinter",
    "turtle",
    "pydoc_data",
    "lib2to3",
    "ensurepip",
    "venv",
}


def docstrings() -> list[tuple[str, str]]:
    out = []
    warnings.simplefilter("ignore")
    for name in MODULES:
        if name in SKIP:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for qual, obj in [(name, mod)] + [
            (f"{name}.{k}", v) for k, v in sorted(vars(mod).items()) if not k.startswith("_")
        ]:
            if getattr(obj, "__module__", name) not in (name, None) and qual != name:
                continue
            doc = (
                inspect.getdoc(obj)
                if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj))
                else None
            )
            if doc and len(doc) >= 80:
                out.append((qual, doc))
    seen, uniq = set(), []
    for qual, doc in out:
        if doc not in seen:
            seen.add(doc)
            uniq.append((qual, doc))
    return uniq


def main(dest: str) -> None:
    docs = docstrings()
    docs.sort(key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    split = int(len(docs) * 0.8)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for i, batch in enumerate([docs[:split], docs[split:]], start=1):
        lines = [json.dumps({"id": qual, "text": doc, "source": "python-stdlib"}) for qual, doc in batch]
        if i == 1:
            # deliberate defects: exact duplicates, bad JSON, missing/non-string text
            lines += lines[:5]
            lines += [
                '{"id": "broken-1", "text": "unterminated',
                '{"id": "no-text"}',
                '{"id": "num", "text": 42}',
                "not json at all",
            ]
        (out / f"batch-{i:03d}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"batch-{i:03d}.jsonl: {len(lines)} lines", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/sample")
