"""The feedback store, the loop's incident gates and its choice of next step.

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
# the loop's next steps: each is an asset llmops://<recipe>/<action> with its own incident gate
ACTIONS = ("retrain", "rollback", "reevaluate")
COOLDOWN_FIELDS = {
    "retrain": "monitoring.loop.cooldown_s",
    "rollback": "monitoring.loop.rollback_cooldown_s",
    "reevaluate": "monitoring.loop.reevaluate_cooldown_s",
}


def _parse_ts(raw: Any) -> dt.datetime:
    ts = dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


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
    record = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record}
    reason = check_record(record)
    if reason:
        raise ValueError(f"feedback record {record.get('id')!r}: {reason}")
    file = Path(path) / f"{dt.datetime.now(dt.UTC):%Y-%m-%d}.jsonl"
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return file


def incident_gate(
    active: dict[str, str], state: dict[str, Any] | None, now: float, cooldown_s: float, action: str = "retrain"
) -> tuple[bool, dict[str, Any], str]:
    """Decide whether the reasons active now may start ``action``: one incident, one run.

    ``active`` maps each reason kind now asking for the action (``slo_breach``, ``new_data``,
    ``feedback``, ``drift``, ...) to its incident key: the same key in a later check is the same
    incident (a persisting breach keeps its key; new data has the new fingerprint as key).
    ``state`` is what the previous call returned (persisted by the caller, one state per action);
    ``now`` is epoch seconds. A kind no longer active closes its incident, so its next occurrence is new.

    Returns ``(allow, new_state, why)``. Allowed only when some incident is new and the last
    request is at least ``cooldown_s`` old; an incident refused during the cool-down stays new.
    """
    state = dict(state or {})
    handled = {k: v for k, v in (state.get("incidents") or {}).items() if k in active}
    new = {k: v for k, v in active.items() if handled.get(k) != v}
    last = state.get("last_request_at")
    state["incidents"] = handled
    if not active:
        return False, state, f"nothing asks for a {action}"
    if not new:
        return False, state, f"incident already handled by the {action} requested at {_iso(last)}: {sorted(active)}"
    if last is not None and now - float(last) < cooldown_s:
        wait = cooldown_s - (now - float(last))
        return (
            False,
            state,
            (
                f"cool-down: the last {action} was requested at {_iso(last)}; "
                f"{sorted(new)} wait {wait:.0f}s more ({COOLDOWN_FIELDS.get(action, 'monitoring.loop.cooldown_s')})"
            ),
        )
    state["incidents"] = {**handled, **new}
    state["last_request_at"] = now
    state["last_reasons"] = sorted(new)
    return True, state, f"new incident(s) {sorted(new)}: requesting a {action}"


def retrain_gate(
    active: dict[str, str], state: dict[str, Any] | None, now: float, cooldown_s: float
) -> tuple[bool, dict[str, Any], str]:
    """:func:`incident_gate` for retraining (kept for callers of the first version of the loop)."""
    return incident_gate(active, state, now, cooldown_s, "retrain")


def _iso(epoch: Any) -> str:
    if epoch is None:
        return "never"
    return dt.datetime.fromtimestamp(float(epoch), dt.UTC).isoformat(timespec="seconds")


def retrain_gate_variable(recipe_name: str) -> str:
    """Airflow Variable holding :func:`retrain_gate`'s state for a recipe."""
    return gate_variable(recipe_name, "retrain")


def gate_variable(recipe_name: str, action: str) -> str:
    """Airflow Variable holding the incident gate's state of one action (``retrain``, ``rollback``, ``reevaluate``)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown loop action {action!r}; expected one of {ACTIONS}")
    return f"llmops.{recipe_name}.{action}_gate"


def action_uri(recipe_name: str, action: str) -> str:
    """Asset URI of a loop action: ``llmops://<recipe>/retrain|rollback|reevaluate``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown loop action {action!r}; expected one of {ACTIONS}")
    return f"llmops://{recipe_name}/{action}"


def gate_monitor_result(
    result: dict[str, Any], state: dict[str, Any] | None, now: float, action: str = "retrain"
) -> tuple[bool, dict[str, Any], str]:
    """:func:`incident_gate` applied to a monitor ``check`` result for one action (what ``needs_<action>`` runs).

    Retraining reads the result's top-level ``incidents``/``cooldown_s``; the other actions read
    ``actions[<action>]`` (``{incidents, cooldown_s, reasons}``). Each action has its own state.
    """
    if action == "retrain":
        incidents = result.get("incidents")
        if incidents is None:  # a result without incident keys: one incident per retrain flag
            incidents = {"retrain": "requested"} if result.get("retrain") else {}
        cooldown = result.get("cooldown_s")
    else:
        entry = (result.get("actions") or {}).get(action) or {}
        incidents, cooldown = dict(entry.get("incidents") or {}), entry.get("cooldown_s")
    return incident_gate(incidents, state, now, float(cooldown or 0), action)


# --------------------------------------------------------------------------- which next step


def rollback_candidate(record: dict[str, Any] | None, now: float, within_s: float) -> tuple[dict | None, str]:
    """The deployment a production regression would roll back, from the deployment record.

    ``record`` is ``home()/deployments/<recipe>.json`` as the deploy operator writes it. A rollback
    is possible when the record's last outcome promoted its version, names a different previous
    champion and was written at most ``within_s`` seconds before ``now``. Returns
    ``({from_version, to_version, promoted_at, age_s}, why)`` or ``(None, why)``.
    """
    if not record:
        return None, "no deployment record: nothing was rolled out here"
    version, previous = record.get("model_version"), record.get("previous_champion")
    if record.get("outcome") != "promoted":
        return None, f"the last rollout's outcome is {record.get('outcome')!r}, not a promotion"
    if previous in (None, "") or str(previous) == str(version):
        return None, f"v{version} has no previous champion: nothing to roll back to"
    try:
        promoted = dt.datetime.strptime(str(record.get("deployed_at")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None, f"deployment record has no readable deployed_at ({record.get('deployed_at')!r})"
    age = now - promoted
    if age > within_s:
        return None, (
            f"v{version} was promoted {age / 3600:.1f}h ago, beyond monitoring.loop.rollback_within_s "
            f"({within_s / 3600:g}h): not a fresh regression"
        )
    found = {
        "from_version": str(version),
        "to_version": str(previous),
        "promoted_at": record.get("deployed_at"),
        "age_s": round(age, 1),
    }
    return found, f"v{version} was promoted {age / 60:.0f} min ago over v{previous}"


def next_steps(
    *,
    slo_status: str,
    slo_reasons: list[str],
    probe: dict[str, Any] | None,
    record: dict[str, Any] | None,
    eval_inputs_changed: list[str],
    now: float,
    loop: Any,
) -> dict[str, dict[str, Any]]:
    """Which loop action each condition asks for, besides retraining (decided by the monitor itself).

    - an SLO breach (``slo_status == "breach"``) or a probe quality breach (``probe["status"] ==
      "breach"``) of a champion promoted within ``loop.rollback_within_s`` over a previous
      champion: **rollback** (the incident key names the demoted version, so one regression of
      one promotion starts one rollback);
    - a probe quality breach of an older champion, or ``eval_inputs_changed`` (what the champion
      was not evaluated on: a new held-out split, a new prompt-set version): **reevaluate**
      (a rollback in the same check takes precedence: re-judging a version being removed is moot).

    ``loop`` is the recipe's ``monitoring.loop``. Returns ``{action: {incidents, reasons,
    cooldown_s, evidence}}`` for ``rollback`` and ``reevaluate`` (empty incidents = nothing asked).
    """
    out = {
        "rollback": {"incidents": {}, "reasons": [], "cooldown_s": loop.rollback_cooldown_s, "evidence": {}},
        "reevaluate": {"incidents": {}, "reasons": [], "cooldown_s": loop.reevaluate_cooldown_s, "evidence": {}},
    }
    probe_breach = bool(probe) and probe.get("status") == "breach"
    probe_reason = (
        f"probe ROUGE-L {probe.get('rouge_l'):.3f} < {probe.get('limit')} over {probe.get('n')} prompts"
        if probe_breach and probe.get("rouge_l") is not None
        else "probe quality breach"
    )
    regressions = []
    if slo_status == "breach" and loop.rollback_on_slo_breach:
        regressions.append(("slo_breach", "; ".join(slo_reasons) or "SLO breach"))
    if probe_breach and loop.rollback_on_probe_breach:
        regressions.append(("probe_breach", probe_reason))
    candidate, why = rollback_candidate(record, now, loop.rollback_within_s) if regressions else (None, "")
    rollback = out["rollback"]
    if regressions and candidate:
        for kind, reason in regressions:
            rollback["incidents"][kind] = f"v{candidate['from_version']}"
            rollback["reasons"].append(f"{reason}: {why}; rolling back to v{candidate['to_version']}")
        rollback["evidence"] = {
            **candidate,
            "conditions": [k for k, _ in regressions],
            "slo_reasons": list(slo_reasons),
            "probe": _probe_summary(probe),
        }
    elif regressions:
        rollback["reasons"].append(f"{'; '.join(r for _, r in regressions)}: no rollback ({why})")
    reevaluate = out["reevaluate"]
    if rollback["incidents"]:
        return out
    version = (record or {}).get("model_version")
    if probe_breach and loop.reevaluate_on_probe_breach:
        reevaluate["incidents"]["probe_breach"] = f"v{version}"
        reevaluate["reasons"].append(f"{probe_reason}: re-evaluating champion v{version}")
    if eval_inputs_changed and loop.reevaluate_on_new_eval_inputs:
        reevaluate["incidents"]["eval_inputs"] = f"v{version}:" + ",".join(sorted(eval_inputs_changed))
        reevaluate["reasons"].append(f"champion v{version} was not evaluated on: {', '.join(eval_inputs_changed)}")
    if reevaluate["incidents"]:
        reevaluate["evidence"] = {
            "model_version": str(version) if version is not None else None,
            "eval_inputs_changed": list(eval_inputs_changed),
            "probe": _probe_summary(probe),
        }
    return out


def _probe_summary(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    if not probe:
        return None
    return {k: probe.get(k) for k in ("status", "rouge_l", "prefix_match", "n", "limit", "dataset_commit")}


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
