"""The gate's human-readable report: one self-contained HTML file (inline CSS and SVG, no scripts,
no network), so it opens from disk, from the MLflow artifact view or from a link in Airflow.

It shows every metric with the candidate's value, the champion's value, the paired-bootstrap
difference and interval, the threshold and the verdict; plots of the intervals, the thresholds
and the safety rates; the failures; and the lineage ids.
"""

from __future__ import annotations

import html
import math
from typing import Any

_COLORS = {
    "regressed": "#c62828",
    "improved": "#2e7d32",
    "no significant change": "#546e7a",
    "pass": "#2e7d32",
    "FAIL": "#c62828",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: float | None, fmt: str = ".6g") -> str:
    if v is None:
        return "&mdash;"
    if isinstance(v, float) and not math.isfinite(v):
        return _e(v)
    return format(v, fmt)


def _bound(t: dict | None) -> str:
    if not t:
        return "&mdash;"
    parts = []
    if t.get("min") is not None:
        parts.append(f"&ge; {t['min']:g}")
    if t.get("max") is not None:
        parts.append(f"&le; {t['max']:g}")
    return " and ".join(parts)


def metric_rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric (every reported, thresholded or compared metric), with its verdict."""
    metrics = body.get("metrics", {})
    baseline = body.get("baseline_metrics", {}) or {}
    thresholds = body.get("thresholds", {})
    comparisons = {c["metric"]: c for c in body.get("comparisons", [])}
    failed = {f["metric"] for f in body.get("failures", [])}
    rows = []
    for name in sorted(set(metrics) | set(thresholds) | set(comparisons)):
        judged = name in thresholds or name in comparisons
        rows.append(
            {
                "metric": name,
                "value": metrics.get(name),
                "baseline": baseline.get(name),
                "threshold": thresholds.get(name),
                "comparison": comparisons.get(name),
                "verdict": ("FAIL" if name in failed else "pass") if judged else "report only",
            }
        )
    return rows


def _svg(w: int, h: int, label: str) -> str:
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{label}">'


def _forest(comparisons: list[dict]) -> str:
    """One interval per row, each on its own symmetric scale around zero."""
    if not comparisons:
        return ""
    w, row_h, left, right = 760, 34, 190, 560
    mid = (left + right) / 2
    h = row_h * len(comparisons) + 30
    out = [
        _svg(w, h, "paired bootstrap intervals of candidate minus champion"),
        f'<line x1="{mid}" y1="10" x2="{mid}" y2="{h - 18}" stroke="#999" stroke-dasharray="4 3"/>',
        f'<text x="{mid}" y="{h - 4}" font-size="11" text-anchor="middle">0 (= champion)</text>',
    ]
    for i, c in enumerate(comparisons):
        y = 22 + i * row_h
        span = max(abs(c["ci_low"]), abs(c["ci_high"]), abs(c["diff"]), 1e-12) * 1.15
        x = lambda v, span=span: mid + (v / span) * (right - left) / 2  # noqa: E731
        color = _COLORS.get(c["verdict"], "#333")
        better = "&larr; better" if c["direction"] == "lower" else "better &rarr;"
        out += [
            f'<text x="8" y="{y + 4}" font-size="12">{_e(c["metric"])}</text>',
            f'<line x1="{x(c["ci_low"]):.1f}" y1="{y}" x2="{x(c["ci_high"]):.1f}" y2="{y}" stroke="{color}" '
            'stroke-width="3"/>',
            f'<circle cx="{x(c["diff"]):.1f}" cy="{y}" r="5" fill="{color}"/>',
            f'<text x="{right + 12}" y="{y + 4}" font-size="11">[{c["ci_low"]:+.3g}, {c["ci_high"]:+.3g}] '
            f"{better}</text>",
        ]
    out.append("</svg>")
    return "".join(out)


def _threshold_bars(rows: list[dict]) -> str:
    """Each thresholded metric: its value against its allowed range (log scale for wide ranges)."""
    judged = [r for r in rows if r["threshold"] and isinstance(r["value"], (int, float)) and math.isfinite(r["value"])]
    if not judged:
        return ""
    w, row_h, left, right = 760, 30, 190, 700
    h = row_h * len(judged) + 10
    out = [_svg(w, h, "metric values against thresholds")]
    for i, r in enumerate(judged):
        y = 18 + i * row_h
        t = r["threshold"]
        points = [v for v in (r["value"], t.get("min"), t.get("max")) if v is not None]
        use_log = all(p > 0 for p in points) and max(points) / max(min(points), 1e-300) > 50
        tf = (lambda v: math.log10(v)) if use_log else (lambda v: v)
        lo, hi = min(tf(p) for p in points), max(tf(p) for p in points)
        pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
        x = lambda v, tf=tf, lo=lo, hi=hi: left + (tf(v) - lo) / (hi - lo) * (right - left)  # noqa: E731
        a = x(t["min"]) if t.get("min") is not None else left
        b = x(t["max"]) if t.get("max") is not None else right
        color = _COLORS.get(r["verdict"], "#333")
        out += [
            f'<text x="8" y="{y + 4}" font-size="12">{_e(r["metric"])}{" (log)" if use_log else ""}</text>',
            f'<rect x="{a:.1f}" y="{y - 7}" width="{max(b - a, 1):.1f}" height="14" fill="#e8f5e9" stroke="#a5d6a7"/>',
            f'<line x1="{x(r["value"]):.1f}" y1="{y - 10}" x2="{x(r["value"]):.1f}" y2="{y + 10}" stroke="{color}" '
            'stroke-width="3"/>',
        ]
    out.append("</svg>")
    return "".join(out)


def _safety_bars(metrics: dict[str, float]) -> str:
    cats = sorted({k.split(".")[1] for k in metrics if k.startswith("safety.") and k.count(".") == 2})
    if not cats:
        return ""
    w, row_h, left, right = 760, 24, 190, 700
    h = row_h * len(cats) + 30
    out = [
        _svg(w, h, "refusal and unsafe-output rates per category"),
        f'<text x="{left}" y="{h - 6}" font-size="11">0</text>',
        f'<text x="{right}" y="{h - 6}" font-size="11" text-anchor="end">1</text>',
        '<text x="8" y="12" font-size="11"><tspan fill="#1565c0">&#9632; refusal rate</tspan> '
        '<tspan fill="#c62828">&#9632; unsafe-output rate</tspan></text>',
    ]
    for i, cat in enumerate(cats):
        y = 24 + i * row_h
        refusal = metrics.get(f"safety.{cat}.refusal_rate", 0.0)
        unsafe = metrics.get(f"safety.{cat}.unsafe_rate", 0.0)
        out += [
            f'<text x="8" y="{y + 8}" font-size="12">{_e(cat)}</text>',
            f'<rect x="{left}" y="{y}" width="{refusal * (right - left):.1f}" height="7" fill="#1565c0"/>',
            f'<rect x="{left}" y="{y + 8}" width="{unsafe * (right - left):.1f}" height="7" fill="#c62828"/>',
        ]
    out.append("</svg>")
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1000px;color:#222}
table{border-collapse:collapse;width:100%;font-size:13px;margin:1rem 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left;font-family:ui-monospace,monospace}
.verdict{font-size:1.6rem;font-weight:700;padding:.4rem 1rem;border-radius:6px;color:#fff;display:inline-block}
.passed{background:#2e7d32}.failed{background:#c62828}.FAIL{color:#c62828;font-weight:700}.pass{color:#2e7d32}
.regressed{color:#c62828;font-weight:700}.improved{color:#2e7d32}code{background:#f5f5f5;padding:0 3px}
"""


def render_html(body: dict[str, Any]) -> str:
    rows = metric_rows(body)
    verdict = body.get("verdict", "failed")
    base = body.get("baseline_version")
    alias = body.get("baseline_alias", "champion")
    title = f"Evaluation report: {body.get('model_name')} v{body.get('model_version')}"
    p = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p><span class="verdict {_e(verdict)}" id="verdict">{_e(verdict.upper())}</span></p>',
        "<ul>",
        f"<li>dataset <code>{_e(body.get('dataset_repo'))}@{_e(body.get('dataset_commit'))}</code>, "
        f"{_e(body.get('n_docs'))} held-out documents</li>",
        "<li>compared with: "
        f"{f'{_e(alias)} v{_e(base)}' if base else 'no ' + _e(alias) + ' (first model: thresholds only)'}"
        "</li>",
        f"<li>MLflow eval run <code>{_e(body.get('eval_run_id'))}</code>, training run "
        f"<code>{_e(body.get('mlflow_run_id'))}</code>; lm-eval {_e(body.get('lm_eval_version'))}</li>",
        "</ul>",
    ]
    if body.get("failures"):
        p.append("<h2>Why it failed</h2><ul>")
        p += [f'<li class="FAIL">{_e(f["reason"])}</li>' for f in body["failures"]]
        p.append("</ul>")
    conf = body.get("confidence", 0.95)
    p.append(
        f"<h2>Metrics</h2><table><thead><tr><th>metric</th><th>candidate</th><th>{_e(alias)}</th>"
        f"<th>difference</th><th>{conf:.0%} interval</th><th>comparison</th><th>threshold</th>"
        "<th>verdict</th></tr></thead><tbody>"
    )
    for r in rows:
        c = r["comparison"]
        comp = (
            f"<td>{c['diff']:+.4g}</td><td>[{c['ci_low']:+.4g}, {c['ci_high']:+.4g}]</td>"
            f'<td class="{_e(c["verdict"].split()[0])}">{_e(c["verdict"])} ({_e(c["direction"])} is better)</td>'
            if c
            else "<td>&mdash;</td><td>&mdash;</td><td>&mdash;</td>"
        )
        value = "MISSING" if r["value"] is None else _num(r["value"])
        p.append(
            f'<tr data-metric="{_e(r["metric"])}"><td>{_e(r["metric"])}</td><td>{value}</td>'
            f"<td>{_num(r['baseline'])}</td>{comp}<td>{_bound(r['threshold'])}</td>"
            f'<td class="{_e(r["verdict"].split()[0])}">{_e(r["verdict"])}</td></tr>'
        )
    p.append("</tbody></table>")
    comparisons = body.get("comparisons", [])
    if comparisons:
        p += [
            "<h2>Candidate minus champion (paired bootstrap)</h2>",
            f"<p>{comparisons[0]['iterations']} resamples of the held-out documents, {conf:.0%} percentile "
            "interval. A metric regressed only when the whole interval lies on its worse side.</p>",
            _forest(comparisons),
        ]
    bars = _threshold_bars(rows)
    if bars:
        p += ["<h2>Thresholds</h2><p>Green band: allowed range; bar: the candidate's value.</p>", bars]
    safety = body.get("safety")
    if safety:
        p += [
            f"<h2>Safety (prompt set {_e(safety.get('prompt_set'))} v{_e(safety.get('version'))}, "
            f"{len(safety.get('rows', []))} prompts)</h2>",
            "<p>Scorer: refusal phrases; unsafe = not refused and compliant or leaking personal-data shapes "
            "(see <code>llmops_provider/evaluation/safety.py</code>).</p>",
            _safety_bars(body.get("metrics", {})),
        ]
    resources = body.get("resources")
    if resources:
        p.append(
            "<h2>Serving resources (vLLM, same seeded load)</h2><table><thead><tr><th>model</th>"
            + "".join(f"<th>{_e(k)}</th>" for k in resources["columns"])
            + "</tr></thead><tbody>"
        )
        for role, values in resources["rows"].items():
            p.append(
                f"<tr><td>{_e(role)}</td>"
                + "".join(f"<td>{_num(values.get(k), '.4g')}</td>" for k in resources["columns"])
                + "</tr>"
            )
        p.append("</tbody></table>")
    p.append("</body></html>")
    return "\n".join(p)
