"""The whole lifecycle of recipe ``tiny-llama`` on the local stack, through Airflow's REST API.

    source deploy/local/env.sh && deploy/local/stack.sh start && .venv/bin/python deploy/local/demo.py

Lands a data batch, triggers ``tiny-llama_data`` and follows the asset-triggered chain
data -> train -> evaluate -> deploy, runs the monitor, then lands a second batch and shows
the monitor requesting a retrain (a new data run scheduled by the retrain asset). Prints a
summary read from the tasks' XComs and writes it to ``$LLMOPS_HOME/demo-summary.json``.
Exits non-zero when any step fails. Safe to re-run on a live stack.

stdlib only: it runs with the control-plane interpreter but imports no Airflow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "tiny-llama"
CHAIN = [("data", 1800), ("train", 3600), ("evaluate", 1800), ("deploy", 1800)]  # stage, timeout s
FINISHED = {"success", "failed", "skipped", "upstream_failed", "removed"}
POLL_S = 3.0


class DemoFailed(RuntimeError):
    pass


class ApiError(DemoFailed):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


LLMOPS_HOME = Path(env("LLMOPS_HOME", str(ROOT / ".llmops")))
AIRFLOW_HOME = Path(env("AIRFLOW_HOME", str(LLMOPS_HOME / "airflow")))
AIRFLOW_URL = f"http://127.0.0.1:{env('AIRFLOW_PORT', '8080')}"
MLFLOW_URL = f"http://127.0.0.1:{env('MLFLOW_PORT', '5000')}"
PROMETHEUS_URL = f"http://127.0.0.1:{env('PROMETHEUS_PORT', '9090')}"
PASSWORDS_FILE = Path(
    env(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
        str(AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"),
    )
)
_T0 = time.monotonic()


def say(msg: str = "") -> None:
    print(f"[{time.monotonic() - _T0:6.0f}s] {msg}" if msg else "", flush=True)


def dag_id(stage: str) -> str:
    return f"{RECIPE}_{stage}"


# ---------------------------------------------------------------- REST client


class Airflow:
    """Just enough of the Airflow 3 REST API (v2, JWT from /auth/token)."""

    def __init__(self, base_url: str, user: str, password: str) -> None:
        self.base_url = base_url
        self.user = user
        self.password = password
        self.token: str | None = None

    def login(self) -> None:
        body = json.dumps({"username": self.user, "password": self.password}).encode()
        req = urllib.request.Request(
            f"{self.base_url}/auth/token", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                self.token = json.load(resp)["access_token"]
        except urllib.error.HTTPError as exc:
            raise DemoFailed(
                f"login to {self.base_url} as {self.user} failed: HTTP {exc.code} {exc.read()[:300]!r}; "
                f"the password is in {PASSWORDS_FILE}"
            ) from None

    def call(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None, ok404: bool = False
    ) -> Any:
        url = f"{self.base_url}/api/v2{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        for attempt in range(2):
            if self.token is None:
                self.login()
            req = urllib.request.Request(
                url,
                method=method,
                data=None if body is None else json.dumps(body).encode(),
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                },
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 0:  # token expired: log in again once
                    self.token = None
                    continue
                if exc.code == 404 and ok404:
                    return None
                raise ApiError(
                    f"{method} {url} -> HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}", exc.code
                ) from None
            except urllib.error.URLError as exc:
                raise DemoFailed(
                    f"{method} {url}: Airflow API unreachable ({exc.reason}); "
                    "is the stack up? deploy/local/stack.sh status"
                ) from None
        raise DemoFailed(f"{method} {url}: unauthorized after a fresh login")

    # helpers
    def run(self, dag: str, run_id: str) -> dict:
        return self.call("GET", f"/dags/{dag}/dagRuns/{q(run_id)}")

    def task_instances(self, dag: str, run_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag}/dagRuns/{q(run_id)}/taskInstances", query={"limit": 100})[
            "task_instances"
        ]

    def xcom(self, dag: str, run_id: str, task: str) -> Any:
        entry = self.call(
            "GET", f"/dags/{dag}/dagRuns/{q(run_id)}/taskInstances/{task}/xcomEntries/return_value", ok404=True
        )
        return None if entry is None else entry.get("value")

    def log_tail(self, dag: str, run_id: str, task: str, try_number: int, lines: int = 40) -> list[str]:
        try:
            data = self.call(
                "GET",
                f"/dags/{dag}/dagRuns/{q(run_id)}/taskInstances/{task}/logs/{try_number}",
                query={"full_content": "true"},
            )
        except DemoFailed as exc:
            return [f"(log not readable: {exc})"]
        out = []
        for entry in (data or {}).get("content", []):
            if isinstance(entry, dict):
                level = entry.get("level", "")
                out.append(f"{level:>7} {entry.get('event', '')}" if level else str(entry.get("event", "")))
                for err in entry.get("error_detail") or []:  # the exception, without the frames
                    last = (err.get("frames") or [{}])[-1]
                    out.append(
                        f"        {err.get('exc_type')}: {err.get('exc_value')}"
                        f"  (at {last.get('filename')}:{last.get('lineno')})"
                    )
            else:
                out.append(str(entry))
        return out[-lines:]


def q(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")


def ui_task_url(dag: str, run_id: str, task: str, try_number: int | None = None) -> str:
    url = f"{AIRFLOW_URL}/dags/{dag}/runs/{q(run_id)}/tasks/{task}"
    return f"{url}?try_number={try_number}" if try_number else url


def parse_ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


# ---------------------------------------------------------------- steps


def wait_for_api(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{AIRFLOW_URL}/api/v2/monitor/health", timeout=5) as resp:
                health = json.load(resp)
            bad = [k for k, v in health.items() if isinstance(v, dict) and v.get("status") != "healthy"]
            if not bad:
                return
            why = f"unhealthy: {', '.join(bad)}"
        except (OSError, ValueError) as exc:
            why = str(exc)
        if time.monotonic() > deadline:
            raise DemoFailed(f"Airflow at {AIRFLOW_URL} not healthy ({why}); start it: deploy/local/stack.sh start")
        time.sleep(2)


def admin_password() -> str:
    try:
        return json.loads(PASSWORDS_FILE.read_text())["admin"]
    except (OSError, ValueError, KeyError):
        raise DemoFailed(
            f"no admin password in {PASSWORDS_FILE}: is the stack started with deploy/local/env.sh?"
        ) from None


def land(batch: str) -> bool:
    """Copy data/sample/<batch> into the landing dir, atomically; False if already there."""
    src = ROOT / "data" / "sample" / batch
    landing = LLMOPS_HOME / "landing" / RECIPE
    landing.mkdir(parents=True, exist_ok=True)
    dst = landing / batch
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        say(f"landing: {dst} already there")
        return False
    tmp = landing / f".{batch}.partial"  # hidden: readers skip it until the rename
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    say(f"landing: copied {src.relative_to(ROOT)} -> {dst} ({dst.stat().st_size} bytes)")
    return True


def wait_for_dags(api: Airflow, dags: list[str], timeout: float = 300) -> None:
    say(f"waiting for the DAGs of recipe {RECIPE} to be parsed: {', '.join(dags)}")
    deadline = time.monotonic() + timeout
    while True:
        missing = [d for d in dags if api.call("GET", f"/dags/{d}", ok404=True) is None]
        if not missing:
            say("all DAGs parsed")
            return
        errors = api.call("GET", "/importErrors", query={"limit": 20}).get("import_errors", [])
        if time.monotonic() > deadline:
            detail = (
                "".join(
                    f"\n  {e.get('filename')}:\n    " + str(e.get("stack_trace", "")).strip().replace("\n", "\n    ")
                    for e in errors
                )
                or " (no import errors reported)"
            )
            raise DemoFailed(f"DAGs not parsed after {timeout:.0f}s: {', '.join(missing)}. Import errors:{detail}")
        time.sleep(POLL_S)


def unpause(api: Airflow, dags: list[str]) -> None:
    for d in dags:
        if api.call("GET", f"/dags/{d}")["is_paused"]:
            api.call("PATCH", f"/dags/{d}", {"is_paused": False})
            say(f"unpaused {d}")


def active_runs(api: Airflow, dag: str) -> list[dict]:
    return api.call(
        "GET", f"/dags/{dag}/dagRuns", query={"state": ["queued", "running"], "order_by": "run_after", "limit": 20}
    )["dag_runs"]


def start_data_run(api: Airflow) -> tuple[str, bool]:
    """Adopt a data run already in flight (a cron DAG's first scheduled run, a retrain), else trigger one.

    Returns (run id, adopted).
    """
    active = active_runs(api, dag_id("data"))
    if active:
        run = active[0]
        say(
            f"{dag_id('data')}: run {run['dag_run_id']} ({run['run_type']}) is already in flight; following it "
            "instead of triggering another"
        )
        return run["dag_run_id"], True
    return trigger(api, dag_id("data")), False


def wait_idle(api: Airflow, dag: str, timeout: float = 3600) -> None:
    """Let runs already in flight (e.g. the scheduled one of a fresh start) finish first."""
    deadline = time.monotonic() + timeout
    shown: set[str] = set()
    while True:
        active = active_runs(api, dag)
        if not active:
            return
        for r in active:
            if r["dag_run_id"] not in shown:
                shown.add(r["dag_run_id"])
                say(f"{dag}: waiting for run {r['dag_run_id']} ({r['run_type']}, {r['state']}) to finish first")
        if time.monotonic() > deadline:
            raise DemoFailed(f"{dag} still has active runs after {timeout:.0f}s: {[r['dag_run_id'] for r in active]}")
        time.sleep(POLL_S)


def trigger(api: Airflow, dag: str) -> str:
    run = api.call("POST", f"/dags/{dag}/dagRuns", {"logical_date": None, "conf": {}, "note": "deploy/local/demo.py"})
    say(f"triggered {dag}: run {run['dag_run_id']}")
    return run["dag_run_id"]


def follow(api: Airflow, dag: str, run_id: str, timeout: float) -> dict[str, dict]:
    """Print task state changes until the run ends; fail fast with the log of a failed task."""
    say(f"following {dag} / {run_id}")
    deadline = time.monotonic() + timeout
    seen: dict[str, str | None] = {}
    while True:
        tis = {ti["task_id"]: ti for ti in api.task_instances(dag, run_id)}
        for task, ti in sorted(tis.items(), key=lambda kv: (kv[1].get("start_date") or "~", kv[0])):
            state = ti.get("state")
            if seen.get(task, "<new>") == state:
                continue
            seen[task] = state
            if state in FINISHED:
                duration = f" in {ti['duration']:.1f}s" if ti.get("duration") is not None else ""
                mark = {"success": "OK  ", "skipped": "SKIP"}.get(state, "FAIL")
                say(f"  {mark} {dag}.{task}: {state}{duration}")
            elif state:
                say(f"       {dag}.{task}: {state}")
            if state == "failed":
                try_number = ti.get("try_number") or 1
                tail = "\n    ".join(api.log_tail(dag, run_id, task, try_number))
                raise DemoFailed(
                    f"task {dag}.{task} failed (try {try_number}).\n  log: "
                    f"{ui_task_url(dag, run_id, task, try_number)}\n  last log lines:\n    {tail}"
                )
        run = api.run(dag, run_id)
        if run["state"] == "success":
            say(f"{dag} run succeeded ({_duration(run)})")
            return tis
        if run["state"] == "failed":
            raise DemoFailed(
                f"{dag} run {run_id} failed ({_duration(run)}); task states: "
                f"{ {t: ti.get('state') for t, ti in tis.items()} }; see {AIRFLOW_URL}/dags/{dag}"
            )
        if time.monotonic() > deadline:
            raise DemoFailed(
                f"{dag} run {run_id} still {run['state']} after {timeout:.0f}s; see {AIRFLOW_URL}/dags/{dag}"
            )
        time.sleep(POLL_S)


def _duration(run: dict) -> str:
    start, end = parse_ts(run.get("start_date")), parse_ts(run.get("end_date"))
    return f"{(end - start).total_seconds():.0f}s" if start and end else "duration unknown"


def downstream_run(api: Airflow, upstream_dag: str, upstream_run: str, dag: str, timeout: float = 600) -> str:
    """The run of ``dag`` created by an asset event that ``upstream_dag/upstream_run`` emitted."""
    deadline = time.monotonic() + timeout
    upstream_start = api.run(upstream_dag, upstream_run).get("start_date")
    queued_since: float | None = None
    while True:
        try:
            events = api.call(
                "GET",
                "/assets/events",
                query={"source_dag_id": upstream_dag, "source_run_id": upstream_run, "limit": 50},
            )["asset_events"]
        except ApiError as exc:
            if exc.code != 500:
                raise
            # Airflow 3.3 answers 500 while a run the event created is still queued (its
            # start_date is null). Give it 30 s to start, then match by time: the first
            # asset-triggered run after the upstream run started.
            events = []
            queued_since = queued_since or time.monotonic()
            candidates = (
                []
                if time.monotonic() - queued_since < 30
                else api.call(
                    "GET",
                    f"/dags/{dag}/dagRuns",
                    query={
                        "run_type": ["asset_triggered"],
                        "run_after_gte": upstream_start,
                        "order_by": "run_after",
                        "limit": 1,
                    },
                )["dag_runs"]
            )
            if candidates:
                run_id = candidates[0]["dag_run_id"]
                say(
                    f"{dag}: run {run_id} scheduled by an asset event after {upstream_dag}/{upstream_run} "
                    "(matched by time)"
                )
                return run_id
        for event in events:
            for created in event.get("created_dagruns") or []:
                if created.get("dag_id") == dag:
                    say(f"{dag}: run {created['run_id']} scheduled by asset {event.get('uri') or event.get('name')}")
                    return created["run_id"]
        if time.monotonic() > deadline:
            uris = sorted({e.get("uri") for e in events}) or "none"
            raise DemoFailed(
                f"no {dag} run was scheduled by the asset events of {upstream_dag}/{upstream_run} "
                f"(events: {uris}) within {timeout:.0f}s; is {dag} unpaused and asset-scheduled?"
            )
        time.sleep(POLL_S)


def follow_chain(api: Airflow, data_run: str, runs: dict[str, str]) -> bool:
    """Follow data -> train -> evaluate -> deploy; False when the data was unchanged (no new version)."""
    runs["data"] = data_run
    tis = follow(api, dag_id("data"), data_run, CHAIN[0][1])
    if (tis.get("publish") or {}).get("state") == "skipped":
        say(
            f"{dag_id('data')}: the data is unchanged and this recipe already trained on it: nothing to "
            "retrain; the current champion stays"
        )
        return False
    for (prev, _), (stage, timeout) in pairwise(CHAIN):
        runs[stage] = downstream_run(api, dag_id(prev), runs[prev], dag_id(stage))
        follow(api, dag_id(stage), runs[stage], timeout)
    return True


def latest_success(api: Airflow, dag: str) -> str | None:
    runs = api.call("GET", f"/dags/{dag}/dagRuns", query={"state": ["success"], "order_by": "-run_after", "limit": 1})[
        "dag_runs"
    ]
    return runs[0]["dag_run_id"] if runs else None


def send_traffic(api: Airflow, runs: dict[str, str], requests: int = 24) -> dict:
    """A small, seeded load of held-out prompts against the champion, so the monitor sees real series."""
    run = runs.get("deploy") or latest_success(api, dag_id("deploy"))
    deploy = api.xcom(dag_id("deploy"), run, "deploy") if run else None
    commit = api.xcom(dag_id("data"), runs["data"], "commit") if "data" in runs else None
    if not deploy or not commit:
        say("traffic: no deployment to send traffic to")
        return {"sent": 0, "errors": 0}
    os.environ["AIRFLOW__LLMOPS__HOME"] = str(LLMOPS_HOME)  # the stack's dataset store
    sys.path.insert(0, str(ROOT))
    from llmops_provider.datasets import get_store  # the control-plane venv has the provider

    test_split = get_store().local_path(commit["dataset_repo"], commit["dataset_commit"]) / "test.jsonl"
    if not test_split.is_file():
        raise DemoFailed(f"held-out split {test_split} not found: is LLMOPS_HOME ({LLMOPS_HOME}) the stack's home?")
    docs = [json.loads(line)["text"] for line in test_split.read_text().splitlines() if line.strip()]
    prompts = [" ".join(d.split()[:6]) for d in docs][:requests] or ["The"]
    errors, first_error, started = 0, None, time.monotonic()
    for i in range(requests):
        body = json.dumps(
            {
                "model": deploy["served_model_name"],
                "prompt": prompts[i % len(prompts)],
                "max_tokens": 16,
                "temperature": 0.0,
                "seed": i,
            }
        ).encode()
        req = urllib.request.Request(
            f"{deploy['endpoint']}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                json.load(resp)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
    say(
        f"traffic: {requests} completions of held-out prompts in {time.monotonic() - started:.1f}s, "
        f"{errors} errors{f' (first: {first_error})' if first_error else ''}; waiting for Prometheus to scrape them"
    )
    time.sleep(12)  # two scrape intervals (deploy/local/prometheus.yml)
    return {"sent": requests, "errors": errors, "first_error": first_error}


def monitor_once(api: Airflow) -> tuple[str, dict, str | None]:
    dag = dag_id("monitor")
    wait_idle(api, dag, 900)
    run_id = trigger(api, dag)
    tis = follow(api, dag, run_id, 900)
    check = api.xcom(dag, run_id, "check") or {}
    retrain_state = (tis.get("request_retrain") or {}).get("state")
    say(
        f"monitor: status={check.get('status')} new_data={check.get('new_data')} retrain={check.get('retrain')} "
        f"request_retrain={retrain_state}"
    )
    for reason in check.get("reasons") or []:
        say(f"  reason: {reason}")
    for name, slo in (check.get("slos") or {}).items():
        say(f"  SLO {name}: value={slo.get('value')} limit={slo.get('limit')} ok={slo.get('ok')}")
    return run_id, check, retrain_state


# ---------------------------------------------------------------- summary


def build_summary(api: Airflow, runs: dict[str, str], monitor: dict, feedback: dict) -> dict:
    """Each stage's XCom ``return_value`` as is (docs/architecture.md), plus lineage and the UIs."""

    def x(stage: str, task: str) -> dict:
        # stages this demo did not run (unchanged data) report the current champion's last runs
        run = runs.get(stage) or latest_success(api, dag_id(stage))
        if run and stage not in runs:
            runs[stage] = run
        return (api.xcom(dag_id(stage), run, task) or {}) if run else {}

    commit, train, evaluate, deploy = (
        x("data", "commit"),
        x("train", "train"),
        x("evaluate", "evaluate"),
        x("deploy", "deploy"),
    )
    model = deploy.get("model_name") or train.get("model_name")
    version = deploy.get("model_version") or train.get("model_version")
    dataset_commit = deploy.get("dataset_commit") or train.get("dataset_commit") or commit.get("dataset_commit")
    lineage = (
        f"champion {model} v{version} <- run {train.get('mlflow_run_id')} <- dataset "
        f"{commit.get('dataset_repo')}@{dataset_commit}"
    )
    return {
        "recipe": RECIPE,
        "runs": {dag_id(s): r for s, r in runs.items()},
        "data": commit,
        "train": train,
        "evaluate": evaluate,
        "deploy": deploy,
        "monitor": monitor,
        "lineage": lineage,
        "feedback": feedback,
        "ui": {
            "airflow": {
                "url": AIRFLOW_URL,
                "user": api.user,
                "password": api.password,
                "password_file": str(PASSWORDS_FILE),
            },
            "mlflow": MLFLOW_URL,
            "prometheus": PROMETHEUS_URL,
        },
        "stop": "make stop",
    }


def print_summary(s: dict) -> None:
    d, t, e, dep, m, f = s["data"], s["train"], s["evaluate"], s["deploy"], s["monitor"], s["feedback"]
    metrics = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in (e.get("metrics") or {}).items()
    )
    lines = [
        "",
        "=" * 78,
        f"SUMMARY  recipe {s['recipe']}" + ("" if s.get("ok", True) else "   ** FAILED **"),
        "=" * 78,
        f"dataset     {d.get('dataset_repo')}@{d.get('dataset_commit')} (branch {d.get('branch')}, "
        f"new commit: {d.get('created')})",
        f"training    MLflow run {t.get('mlflow_run_id')} -> model {t.get('model_name')} v{t.get('model_version')}"
        f" (final loss {t.get('final_loss')}, reused: {t.get('reused')})",
        f"evaluation  verdict {e.get('verdict')}: {metrics or '-'}",
        f"deployment  {dep.get('endpoint')} serving {dep.get('served_model_name')} (alias {dep.get('alias')})",
        f"            prompt:     {dep.get('prompt')!r}",
        f"            completion: {dep.get('completion')!r}",
        f"lineage     {s['lineage']}",
        f"monitoring  status {m.get('status')}; new data: {m.get('new_data')}; retrain: {m.get('retrain')}; "
        f"traffic {s.get('traffic', {}).get('sent', 0)} requests, {s.get('traffic', {}).get('errors', 0)} errors",
        *[
            f"            SLO {k}: {v.get('value')} (limit {v.get('limit')}, ok {v.get('ok')})"
            for k, v in (m.get("slos") or {}).items()
        ],
        f"feedback    {f.get('message', '-')}",
        "",
        f"Airflow     {s['ui']['airflow']['url']}   user {s['ui']['airflow']['user']}  "
        f"password {s['ui']['airflow']['password']}",
        f"MLflow      {s['ui']['mlflow']}",
        f"Prometheus  {s['ui']['prometheus']}",
        f"summary     {LLMOPS_HOME / 'demo-summary.json'}",
        "stop it     make stop",
        "=" * 78,
    ]
    if s.get("error"):
        lines.insert(4, f"error       {s['error'].splitlines()[0]}")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--follow-retrain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow the retrain chain (data -> train -> evaluate -> deploy) to the end and "
        "monitor the new champion (default); --no-follow-retrain leaves it running",
    )
    parser.add_argument(
        "--land-only",
        action="store_true",
        help="only land the first sample batch (make demo does this before starting the stack, "
        "so the data DAG's first scheduled run finds it)",
    )
    args = parser.parse_args(argv)
    if args.land_only:
        land("batch-001.jsonl")
        return 0

    runs: dict[str, str] = {}
    monitor: dict = {}
    feedback: dict = {}
    traffic: dict = {}
    error: str | None = None
    api = Airflow(AIRFLOW_URL, "admin", "")
    try:
        land("batch-001.jsonl")  # first: a scheduled run starting right away must find it
        wait_for_api()
        api.password = admin_password()
        api.login()
        dags = [dag_id(s) for s, _ in CHAIN] + [dag_id("monitor")]
        wait_for_dags(api, dags)
        unpause(api, dags)

        say("== 1. data -> train -> evaluate -> deploy")
        head, adopted = start_data_run(api)
        try:
            follow_chain(api, head, runs)
        except DemoFailed as exc:
            if not adopted or "train" in runs:
                raise
            # e.g. the data DAG's first cron run started before the batch landed: run our own
            say(f"the adopted run failed ({str(exc).splitlines()[0]}); triggering a fresh one")
            runs.clear()
            wait_idle(api, dag_id("data"))
            follow_chain(api, trigger(api, dag_id("data")), runs)

        say("== 2. traffic, then monitor the deployment")
        traffic = send_traffic(api, runs)
        runs["monitor"], monitor, _ = monitor_once(api)

        say("== 3. feedback loop: new data arrives")
        newly_landed = land("batch-002.jsonl")
        monitor_run, check, retrain_state = monitor_once(api)
        runs["monitor"], monitor = monitor_run, check
        if retrain_state == "success":
            retrain_run = downstream_run(api, dag_id("monitor"), monitor_run, dag_id("data"))
            feedback = {
                "monitor_run": monitor_run,
                "retrain_data_run": retrain_run,
                "message": f"request_retrain ran; retrain asset scheduled {dag_id('data')} run {retrain_run}",
            }
            if args.follow_retrain:
                retrain_runs: dict[str, str] = {}
                follow_chain(api, retrain_run, retrain_runs)
                feedback["retrain_runs"] = {dag_id(s): r for s, r in retrain_runs.items()}
                runs = retrain_runs | {"monitor": monitor_run}
                say("== 4. the new champion under traffic: a quiet system requests nothing")
                traffic = send_traffic(api, runs)
                runs["monitor"], monitor, _ = monitor_once(api)
            else:
                feedback["message"] += " (it runs on in the background; see the Airflow UI)"
        elif not newly_landed and not check.get("new_data"):
            feedback = {
                "monitor_run": monitor_run,
                "retrain_data_run": None,
                "message": "batch-002 was ingested by an earlier demo run: no new data, request_retrain "
                "skipped (as it should be on a re-run)",
            }
        else:
            raise DemoFailed(
                f"the monitor did not request a retrain after batch-002 landed (request_retrain: "
                f"{retrain_state}; check: {json.dumps(check)}); see "
                f"{ui_task_url(dag_id('monitor'), monitor_run, 'check')}"
            )
        say(feedback["message"])
    except DemoFailed as exc:
        error = str(exc)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as exc:  # noqa: BLE001 - still write the summary of what did run
        import traceback

        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"

    summary: dict = {"ok": error is None, "error": error}
    try:
        if api.token:
            summary |= build_summary(api, runs, monitor, feedback) | {"traffic": traffic}
    except DemoFailed as exc:
        summary["summary_error"] = str(exc)
    LLMOPS_HOME.mkdir(parents=True, exist_ok=True)
    summary_path = LLMOPS_HOME / "demo-summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary_path.chmod(0o600)  # it holds the generated Airflow password
    if "lineage" in summary:
        print_summary(summary)
    if error:
        print(f"\nDEMO FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
