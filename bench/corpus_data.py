"""Build the data-stage benchmark corpus from real text on this machine, with planted defects.

    python bench/corpus_data.py --out .llmops/bench/corpus [--docs 40000] [--seed 7]

Real text: the system's man pages (roff source turned into plain text) and package
documentation under /usr/share/doc (changelogs, copyright files, READMEs, HTML stripped of
tags), cut at paragraph boundaries into documents of about 2-12 KB. On top of that, with
a fixed seed:

- exact duplicates (a copy of a document under a new id),
- near duplicates with a KNOWN Jaccard similarity to their source (word 5-gram shingles,
  the pipeline's definition; computed exactly with Python sets, not estimated): words are
  replaced until the similarity reaches a target drawn from 0.55-0.98,
- junk documents (repeated lines, symbol soup, number tables),
- malformed lines (bad JSON, invalid UTF-8, a missing text field, an oversized record).

Writes ``part-00000.jsonl`` ... and ``manifest.json`` (the ground truth: planted pairs
with their Jaccard, junk ids, malformed counts). Deterministic for a given machine.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import random
import re
from pathlib import Path

WORD = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff]+")  # the pipeline's word: ASCII alnum or non-ASCII runs
SHINGLE = 5


def shingle_set(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    """Word n-grams of ``text`` (lowercased ASCII), as the pipeline defines them."""
    words = [w.lower() for w in WORD.findall(text)]
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


# --------------------------------------------------------------------------- real text

_ROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")
_ROFF_ESC = re.compile(r"\\(?:\(..|\[[^\]]*\]|\*\(..|\*\[[^\]]*\]|\*.|[&|^%:/,~])")
_FONT_MACROS = {".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".SM", ".SB", ".SH", ".SS", ".TH", ".Nm", ".Nd"}
_TAG = re.compile(r"<[^>]+>")


def deroff(src: str) -> str:
    """Plain text of a man page's roff source (good enough for a text corpus)."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".\\}")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in _FONT_MACROS and rest:
                out.append(rest.replace('"', ""))
            elif macro in (".PP", ".P", ".LP", ".SH", ".SS", ".TP", ".IP", ".sp", ".br"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    text = _ROFF_FONT.sub("", text).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
    return _ROFF_ESC.sub("", text)


def read_text(path: Path) -> str | None:
    try:
        data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError):
        return None
    if b"\0" in data[:4096]:
        return None  # binary
    text = data.decode("utf-8", errors="replace")
    name = path.name.removesuffix(".gz")
    if "/man/" in str(path):
        return deroff(text)
    if name.endswith((".html", ".htm")):
        return html.unescape(_TAG.sub(" ", text))
    return text


def sources() -> list[Path]:
    files = sorted(p for p in Path("/usr/share/man").rglob("*") if p.is_file() and not p.is_symlink())
    files += sorted(
        p
        for p in Path("/usr/share/doc").rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and p.suffix not in (".png", ".jpg", ".gif", ".svg", ".pdf", ".js", ".css")
    )
    return files


def chunks(text: str, rng: random.Random) -> list[str]:
    """Paragraph-aligned pieces of 2-12 KB (a short text stays whole)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, cur, size, target = [], [], 0, rng.randint(2000, 12000)
    for p in paragraphs:
        cur.append(p)
        size += len(p)
        if size >= target:
            out.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(2000, 12000)
    if cur:
        tail = "\n\n".join(cur)
        if out and size < 1000:
            out[-1] += "\n\n" + tail
        else:
            out.append(tail)
    return [c for c in out if len(c) >= 200]


# --------------------------------------------------------------------------- plants


def near_copy(text: str, target: float, rng: random.Random) -> tuple[str, float]:
    """A copy of ``text`` with random words replaced until its Jaccard to ``text`` is near ``target``."""
    original = shingle_set(text)
    tokens = re.split(r"(\s+)", text)
    word_pos = [i for i, t in enumerate(tokens) if t and not t.isspace()]
    rng.shuffle(word_pos)
    # each replaced word touches up to SHINGLE shingles: start near the expected count, then walk
    lo, hi = 0, len(word_pos)
    best = (text, 1.0)
    for _ in range(12):  # binary search on the number of replaced words
        k = (lo + hi) // 2
        copy = list(tokens)
        for i in word_pos[:k]:
            copy[i] = f"x{rng.randrange(1 << 30):x}"
        candidate = "".join(copy)
        j = jaccard(original, shingle_set(candidate))
        if abs(j - target) < abs(best[1] - target):
            best = (candidate, j)
        if j > target:
            lo = k + 1
        else:
            hi = k - 1
        if lo > hi:
            break
    return best


def junk(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        line = rng.choice(["Buy now! Limited offer.", "click here click here", "subscribe for updates today"])
        return "\n".join([line] * rng.randint(40, 120))
    if kind == 1:
        return " ".join("".join(rng.choice("#$%&*@!~^") for _ in range(rng.randint(3, 9))) for _ in range(400))
    return "\n".join(" ".join(str(rng.randrange(10**6)) for _ in range(8)) for _ in range(rng.randint(60, 200)))


def build(out: Path, n_docs: int, seed: int, parts: int = 8) -> dict:
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = []
    for path in sources():
        text = read_text(path)
        if not text:
            continue
        for i, piece in enumerate(chunks(text, rng)):
            docs.append((f"{path.relative_to('/usr/share')}#{i}", piece))
        if len(docs) >= n_docs:
            break
    docs = docs[:n_docs]
    print(f"corpus: {len(docs)} real documents, {sum(len(t) for _, t in docs) / 1e6:.0f} MB", flush=True)

    by_id = dict(docs)
    ids = sorted(by_id)
    n_exact, n_near, n_junk = len(docs) // 100, len(docs) // 20, len(docs) // 200
    exact = [{"id": f"plant-exact-{k}", "source_id": s} for k, s in enumerate(rng.sample(ids, n_exact))]
    near = []
    for k, s in enumerate(rng.sample(ids, n_near)):
        target = rng.choice([0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.82, 0.85, 0.88, 0.9, 0.93, 0.95, 0.98])
        text, j = near_copy(by_id[s], target, rng)
        near.append({"id": f"plant-near-{k}", "source_id": s, "jaccard": round(j, 4), "text": text})
        if k % 500 == 0:
            print(f"corpus: planted {k}/{n_near} near duplicates", flush=True)
    junk_docs = [(f"plant-junk-{k}", junk(rng)) for k in range(n_junk)]

    records = [json.dumps({"id": i, "text": t}, ensure_ascii=False).encode() for i, t in docs]
    records += [json.dumps({"id": e["id"], "text": by_id[e["source_id"]]}, ensure_ascii=False).encode() for e in exact]
    records += [json.dumps({"id": e["id"], "text": e.pop("text")}, ensure_ascii=False).encode() for e in near]
    records += [json.dumps({"id": i, "text": t}).encode() for i, t in junk_docs]
    malformed = {
        "invalid_json": [b'{"id": "broken", "text": "unterminated'] * 20,
        "invalid_utf8": [b'{"id": "latin1", "text": "caf\xe9 au lait, an encoding mistake"}'] * 20,
        "missing_text": [b'{"id": "no-text", "body": "the text field is missing"}'] * 20,
        "record_too_large": [json.dumps({"id": "huge", "text": "word " * 300_000}).encode()] * 2,
    }
    records += [line for lines in malformed.values() for line in lines]
    rng.shuffle(records)

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.jsonl"):
        old.unlink()
    for p in range(parts):
        with (out / f"part-{p:05d}.jsonl").open("wb") as fh:
            for line in records[p::parts]:
                fh.write(line + b"\n")
    manifest = {
        "seed": seed,
        "shingle": f"word {SHINGLE}-grams, words = [A-Za-z0-9] or non-ASCII runs, lowercased",
        "lines": len(records),
        "real_documents": len(docs),
        "bytes": sum(len(r) + 1 for r in records),
        "exact_duplicates": exact,
        "near_duplicates": near,
        "junk": [i for i, _ in junk_docs],
        "malformed": {k: len(v) for k, v in malformed.items()},
        "digest": hashlib.sha256(b"\n".join(records)).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"corpus: {len(records)} lines, {manifest['bytes'] / 1e6:.0f} MB in {out}", flush=True)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for part-*.jsonl and manifest.json")
    ap.add_argument("--docs", type=int, default=40_000, help="real documents before planting (size flag)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    build(Path(args.out), args.docs, args.seed)


if __name__ == "__main__":
    main()
