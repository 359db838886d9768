"""The data card of a dataset version: what went in, what each step did, what came out.

Written next to the data (so it is committed with the version): ``data_card.json`` (for
machines: the asset event extra and the task log quote it), ``data_card.md`` (for people)
and ``length_histogram.png`` (document lengths per split, in characters and in tokens).
Derived from the data alone - no run ids, no timestamps - so the same input gives the
same card, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")
BINS = 30


def _char_lengths(out: Path) -> dict[str, list[int]]:
    lengths: dict[str, list[int]] = {}
    for split in SPLITS:
        with (out / f"{split}.jsonl").open(encoding="utf-8") as fh:
            lengths[split] = [len(json.loads(line)["text"]) for line in fh]
    return lengths


def _summary(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    arr = np.asarray(values)
    return {"count": int(arr.size), "min": int(arr.min()), "p50": int(np.percentile(arr, 50)),
            "p95": int(np.percentile(arr, 95)), "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}  # fmt: skip


def _plot(chars: dict[str, list[int]], tokens: dict[str, list[int]] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("characters", chars)] + ([("tokens", tokens)] if tokens else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (unit, data) in zip(axes[0], panels, strict=True):
        everything = [v for s in SPLITS for v in data.get(s, [])]
        if everything:
            edges = np.histogram_bin_edges(np.log10(np.maximum(everything, 1)), bins=BINS)
            for split in SPLITS:
                if data.get(split):
                    ax.hist(
                        np.log10(np.maximum(data[split], 1)),
                        bins=edges,
                        alpha=0.6,
                        label=f"{split} ({len(data[split])})",
                    )
        ax.set_xlabel(f"log10(document length in {unit})")
        ax.set_ylabel("documents")
        ax.set_title(f"Document length ({unit})")
        if ax.get_legend_handles_labels()[0]:  # an empty version has no bars (and no legend to draw)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def write_data_card(out: Path, stats: dict, packed: dict | None, chars: dict[str, list[int]] | None = None) -> dict:
    """Write data_card.json/.md and length_histogram.png into ``out``; returns the card. ``chars``:
    the kept documents' lengths in characters per split, when the job has them (else read from
    the split files)."""
    chars = chars if chars is not None else _char_lengths(out)
    tokens = packed["lengths"] if packed else None
    card = {
        "records": {k: stats[k] for k in ("input_lines", "blank_lines", "quarantined", "excluded", "kept")},
        "quarantined_by_reason": stats["quarantined_by_reason"],
        "steps": [{k: s[k] for k in ("step", "in", "out", "dropped", "modified")} for s in stats["steps"]],
        "dedup_clusters": stats.get("near_dedup"),
        "splits": {s: {"docs": stats["splits"][s]["docs"], "chars": stats["splits"][s]["chars"]} for s in SPLITS},
        "length_chars": {s: _summary(chars[s]) for s in SPLITS},
        "length_tokens": {s: _summary(tokens[s]) for s in SPLITS} if tokens else None,
        "tokens": stats.get("tokens"),
        "histogram": "length_histogram.png",
    }
    _plot(chars, tokens, out / "length_histogram.png")
    (out / "data_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (out / "data_card.md").write_text(render(card))
    return card


def render(card: dict) -> str:
    r = card["records"]
    lines = [
        "# Data card",
        "",
        f"{r['input_lines']} input lines: {r['kept']} kept, {r['excluded']} excluded, "
        f"{r['quarantined']} quarantined, {r['blank_lines']} blank.",
        "",
        "| step | in | out | dropped (by reason) | modified |",
        "|---|---|---|---|---|",
    ]
    for s in card["steps"]:
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"| {s['step']} | {s['in']} | {s['out']} | {dropped} | {s['modified'] or '-'} |")
    if card["dedup_clusters"]:
        c = card["dedup_clusters"]
        lines += ["", f"Near-duplicate clusters: {c['clusters']} ({c['documents_in_clusters']} documents, "
                      f"largest {c['largest_cluster']}; Jaccard >= {c['threshold']})."]  # fmt: skip
    lines += ["", "| split | docs | chars | chars p50 / p95 | tokens | blocks |", "|---|---|---|---|---|---|"]
    for split in SPLITS:
        sp, lc = card["splits"][split], card["length_chars"][split]
        tok = (card["tokens"] or {}).get(split, {})
        lines.append(
            f"| {split} | {sp['docs']} | {sp['chars']} | {lc.get('p50', '-')} / {lc.get('p95', '-')} | "
            f"{tok.get('document_tokens', '-')} | {tok.get('blocks', '-')} |"
        )
    lines += ["", "![document lengths](length_histogram.png)", ""]
    return "\n".join(lines)
