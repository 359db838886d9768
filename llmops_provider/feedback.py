"""The feedback store and the retrain gate.

Feedback is JSONL, one record per rated or flagged completion, appended by whatever sits next
to the endpoint (a chat UI, an API gateway) into ``monitoring.feedback.path``::

    {"id": "r-17", "ts": "2026-11-28T06:00:00+00:00", "model_name": "tiny-llama", "model_version": "3",
     "prompt": "Return a list of", "output": "...", "rating": 1, "flag": null, "correction": null}

``rating`` is -1 (bad), 0 (neutral) or 1 (good); ``flag`` marks an output as wrong/unsafe with a
reason; ``correction`` is the answer it should have given. A malformed line is quarantined with
its reason and counted, never dropped silently.

Curated feedback (good outputs, and corrections of bad ones) becomes training text: once
``min_curated_records`` new ones exist, they are landed as one ``feedback-<batch>.jsonl`` file in
the recipe's first data source. That changes the source fingerprint, so the monitor sees new
data and the next data run commits them to the dataset store with everything else.

No Airflow and no engine imports: the monitor operator, the watcher trigger and the tests share it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RATINGS = (-1, 0, 1)
LANDED_PREFIX = "feedback-"


def _parse_ts(raw: Any) -> dt.datetime:
    ts = dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def check_record(record: Any) -> str | None:
    """Why ``record`` is not a valid feedback record (``None`` when it is)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for field in ("id", "prompt"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            return f"field `{field}` missing or not a non-empty string"
    rating = record.get("rating")
    if rating is not None and (isinstance(rating, bool) or rating not in RATINGS):
        return f"field `rating` is {rating!r}; use -1, 0, 1 or null"
    for field in ("output", "flag", "correction"):
        if record.get(field) is not None and not isinstance(record[field], str):
            return f"field `{field}` must be a string or null"
    if rating is None and not record.get("flag"):
        return "neither `rating` nor `flag` set: nothing to learn from"
    try:
        _parse_ts(record.get("ts"))
    except (TypeError, ValueError):
        return f"field `ts` is {record.get('ts')!r}; use an ISO 8601 time, e.g. 2026-11-28T06:00:00+00:00"
    return None


def read_feedback(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All records under ``path`` (``*.jsonl``, hidden files skipped) as (valid, quarantined).

    A quarantined entry is ``{"file", "line", "reason"}``.
    """
    root = Path(path)
    files = sorted(root.rglob("*.jsonl")) if root.is_dir() else ([root] if root.is_file() else [])
    valid: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for file in files:
        if any(part.startswith(".") for part in file.relative_to(root if root.is_dir() else file.parent).parts):
            continue
        with file.open(encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    bad.append({"file": str(file), "line": number, "reason": f"invalid JSON: {exc.msg}"})
                    continue
                reason = check_record(record)
                if reason:
                    bad.append({"file": str(file), "line": number, "reason": reason})
                else:
                    valid.append(record)
    return valid, bad


def is_negative(record: dict[str, Any]) -> bool:
    return record.get("rating") == -1 or bool(record.get("flag"))


def negative_rate(records: Iterable[dict[str, Any]], since: dt.datetime | None = None) -> tuple[float | None, int]:
    """(share of negative records, rated records) among records at or after ``since``; rate None if none."""
    window = [r for r in records if since is None or _parse_ts(r["ts"]) >= since]
    if not window:
        return None, 0
    return sum(is_negative(r) for r in window) / len(window), len(window)


def curated_text(record: dict[str, Any]) -> str | None:
    """Training text from one record: prompt + correction, or prompt + a well-rated output."""
    if record.get("correction"):
        answer = record["correction"]
    elif record.get("rating") == 1 and not record.get("flag") and record.get("output"):
        answer = record["output"]
    else:
        return None
    return f"{record['prompt'].rstrip()} {answer.strip()}".strip()


def curate(records: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Training records ``{"id", "text", "source"}`` (ids stable: ``feedback:<record id>``), deduplicated."""
    out: dict[str, dict[str, str]] = {}
    for record in records:
        text = curated_text(record)
        if text:
            rid = f"feedback:{record['id']}"
            out[rid] = {"id": rid, "text": text, "source": "feedback"}
    return [out[k] for k in sorted(out)]


def landed_ids(landed_path: str | Path) -> set[str]:
    """Ids of curated records already landed in the data source."""
    ids: set[str] = set()
    for file in sorted(Path(landed_path).glob(f"{LANDED_PREFIX}*.jsonl")):
        with file.open(encoding="utf-8") as fh:
            ids.update(json.loads(line)["id"] for line in fh if line.strip())
    return ids


def pending_curated(path: str | Path, landed_path: str | Path) -> list[dict[str, str]]:
    """Curated records from the feedback store not landed yet."""
    valid, _ = read_feedback(path)
    done = landed_ids(landed_path)
    return [r for r in curate(valid) if r["id"] not in done]


def batch_id(records: Iterable[dict[str, str]]) -> str:
    digest = hashlib.sha256("\n".join(sorted(r["id"] for r in records)).encode())
    return digest.hexdigest()[:12]


def land(path: str | Path, landed_path: str | Path, min_records: int) -> dict[str, Any]:
    """Land pending curated feedback as one data file once there are ``min_records`` of it.

    Idempotent: a batch's file name is its content id, written to a hidden temporary file first
    (ignored by the source fingerprint) and renamed into place.
    Returns ``{landed, pending, file, batch}``.
    """
    pending = pending_curated(path, landed_path)
    if len(pending) < min_records:
        return {"landed": 0, "pending": len(pending), "file": None, "batch": None}
    batch = batch_id(pending)
    target = Path(landed_path) / f"{LANDED_PREFIX}{batch}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pending), encoding="utf-8")
    os.replace(tmp, target)
    return {"landed": len(pending), "pending": 0, "file": str(target), "batch": batch}


def append(path: str | Path, record: dict[str, Any]) -> Path:
    """Append one validated record to today's file under ``path`` (for gateways and tests)."""
    record = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **record}
    reason = check_record(record)
    if reason:
        raise ValueError(f"feedback record {record.get('id')!r}: {reason}")
    file = Path(path) / f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.jsonl"
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return file


def retrain_gate(
    active: dict[str, str], state: dict[str, Any] | None, now: float, cooldown_s: float
) -> tuple[bool, dict[str, Any], str]:
    """Decide whether the reasons active now may start a retrain: one incident, one run.

    ``active`` maps each reason kind now asking for a retrain (``slo_breach``, ``new_data``,
    ``feedback``, ``drift``, ...) to its incident key: the same key in a later check is the same
    incident (a persisting breach keeps its key; new data has the new fingerprint as key).
    ``state`` is what the previous call returned (persisted by the caller); ``now`` is epoch
    seconds. A kind no longer active closes its incident, so its next occurrence is new.

    Returns ``(allow, new_state, why)``. Allowed only when some incident is new and the last
    request is at least ``cooldown_s`` old; an incident refused during the cool-down stays new.
    """
    state = dict(state or {})
    handled = {k: v for k, v in (state.get("incidents") or {}).items() if k in active}
    new = {k: v for k, v in active.items() if handled.get(k) != v}
    last = state.get("last_request_at")
    state["incidents"] = handled
    if not active:
        return False, state, "nothing asks for a retrain"
    if not new:
        return False, state, f"incident already handled by the retrain requested at {_iso(last)}: {sorted(active)}"
    if last is not None and now - float(last) < cooldown_s:
        wait = cooldown_s - (now - float(last))
        return (
            False,
            state,
            (
                f"cool-down: the last retrain was requested at {_iso(last)}; "
                f"{sorted(new)} wait {wait:.0f}s more (monitoring.loop.cooldown_s)"
            ),
        )
    state["incidents"] = {**handled, **new}
    state["last_request_at"] = now
    state["last_reasons"] = sorted(new)
    return True, state, f"new incident(s) {sorted(new)}: requesting a retrain"


def _iso(epoch: Any) -> str:
    if epoch is None:
        return "never"
    return dt.datetime.fromtimestamp(float(epoch), dt.timezone.utc).isoformat(timespec="seconds")


def retrain_gate_variable(recipe_name: str) -> str:
    """Airflow Variable holding :func:`retrain_gate`'s state for a recipe."""
    return f"llmops.{recipe_name}.retrain_gate"


def gate_monitor_result(
    result: dict[str, Any], state: dict[str, Any] | None, now: float
) -> tuple[bool, dict[str, Any], str]:
    """:func:`retrain_gate` applied to a monitor ``check`` result (what the ``needs_retrain`` task runs)."""
    incidents = result.get("incidents")
    if incidents is None:  # a result without incident keys: one incident per retrain flag
        incidents = {"retrain": "requested"} if result.get("retrain") else {}
    return retrain_gate(incidents, state, now, float(result.get("cooldown_s") or 0))


def negative_rate_by(records: Iterable[dict[str, Any]], field: str) -> dict[str, dict[str, Any]]:
    """Negative-feedback rate per value of ``field`` (e.g. ``prompt_version``, ``model_version``): an A/B readout."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(str(record.get(field)), []).append(record)
    out = {}
    for key, group in sorted(groups.items()):
        rate, n = negative_rate(group)
        out[key] = {"negative_rate": rate, "records": n}
    return out
