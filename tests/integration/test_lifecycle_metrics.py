"""Lifecycle metrics end to end: Airflow's own StatsD lines -> the mapping -> Prometheus -> llmops:airflow_* rules.

Airflow 3.3 is started the way the scheduler starts its metrics (``stats.initialize`` with
``get_stats_factory()`` under ``[metrics] statsd_on``) in a fresh interpreter, and emits through
its own code: ``DagRun._emit_duration_stats_for_finished_state`` for finished runs, and the
``stats.incr/gauge`` calls of the scheduler and task runner with their metric names and tags. The
lines go over UDP to the local stack's StatsD bridge running deploy/prometheus/statsd-mapping.yml
(Debian 12 has no statsd_exporter; see llmops_provider/statsd_exporter.py), which a real
Prometheus scrapes while evaluating deploy/prometheus/rules.yml (group interval shortened to 1 s).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port, prometheus_server, running

pytestmark = pytest.mark.integration

MAPPING = ROOT / "deploy" / "prometheus" / "statsd-mapping.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

# what the scheduler, the DAG-run and the task runner call (airflow/jobs/scheduler_job_runner.py,
# airflow/models/dagrun.py, airflow/sdk/execution_time/task_runner.py), in a fresh interpreter
EMIT = """
import datetime as dt, sys
from airflow._shared.observability.metrics import stats
from airflow.configuration import conf
from airflow.models.dagrun import DagRun
from airflow.observability.metrics import stats_utils

stats.initialize(
    factory=stats_utils.get_stats_factory(), export_legacy_names=conf.getboolean("metrics", "legacy_names_on")
)
batch = int(sys.argv[1])
stats.incr("scheduler_heartbeat", 1, 1)
start = dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc)
for dag_id, state, minutes in (("tiny-llama_train", "success", 3), ("tiny-llama_data", "failed", 1)):
    run = DagRun(dag_id=dag_id, run_id=f"r{batch}", run_type="asset_triggered", state=state)
    run.start_date, run.end_date = start, start + dt.timedelta(minutes=minutes)
    run._emit_duration_stats_for_finished_state()
tags = {"dag_id": "tiny-llama_monitor", "task_id": "request_retrain"}
stats.incr("ti.finish", tags={**tags, "state": "success"})
stats.incr("ti_successes", tags=tags)
stats.incr("ti.finish", tags={"dag_id": "tiny-llama_data", "task_id": "prepare", "state": "failed"})
stats.incr("ti_failures", tags={"dag_id": "tiny-llama_data", "task_id": "prepare"})
stats.gauge("pool.open_slots", 127, tags={"pool_name": "default_pool"})
stats.gauge("pool.running_slots", 1, tags={"pool_name": "default_pool"})
"""


def emit(statsd_port: int, batch: int, tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd_port),
    }
    out = subprocess.run([sys.executable, "-c", EMIT, str(batch)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]["result"]


def wait_for(fn, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_airflow_statsd_lines_become_lifecycle_series_and_rules(tmp_path):
    udp, web = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "llmops_provider.statsd_exporter",
        f"--statsd.mapping-config={MAPPING}",
        f"--statsd.listen-udp=127.0.0.1:{udp}",
        f"--web.listen-address=127.0.0.1:{web}",
    ]
    metrics = f"http://127.0.0.1:{web}/metrics"
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"  # same expressions, evaluated every second instead of every 15-30 s
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "prom").mkdir()
    with running(cmd, f"http://127.0.0.1:{web}/-/healthy", tmp_path / "exporter.log", timeout=30):
        emit(udp, 1, tmp_path)
        series = wait_for(
            lambda: (s := scrape(metrics)) and any(k.startswith("airflow_pool_slots") for k in s) and s, "the series"
        )
        assert series['airflow_dagrun_duration_seconds_count{dag_id="tiny-llama_train",state="success"}'] == 1
        assert series['airflow_dagrun_duration_seconds_sum{dag_id="tiny-llama_train",state="success"}'] == 180
        assert series['airflow_dagrun_duration_seconds_bucket{dag_id="tiny-llama_train",state="success",le="120"}'] == 0
        assert series['airflow_dagrun_duration_seconds_bucket{dag_id="tiny-llama_train",state="success",le="300"}'] == 1
        assert series['airflow_dagrun_duration_seconds_count{dag_id="tiny-llama_data",state="failed"}'] == 1
        key = 'airflow_ti_finish_total{dag_id="tiny-llama_monitor",state="success",task_id="request_retrain"}'
        assert series[key] == 1
        assert series['airflow_ti_finish_total{dag_id="tiny-llama_data",state="failed",task_id="prepare"}'] == 1
        assert series["airflow_ti_failures_total"] == 1 and series["airflow_scheduler_heartbeat_total"] == 1
        assert series['airflow_pool_slots{pool="default_pool",state="open"}'] == 127
        assert series['airflow_pool_slots{pool="default_pool",state="running"}'] == 1
        # the tag-less modern copies are dropped, not exposed as unlabelled duplicates
        assert not [k for k in series if re.match(r"airflow_(dagrun_duration_success|ti_finish|pool_open_slots)\b", k)]
        assert not [k for k in series if k.startswith("statsd_exporter_lines_dropped_total")]

        with prometheus_server(tmp_path / "prom", [f"127.0.0.1:{web}"], [tmp_path / "rules.yml"]) as prom:
            wait_for(lambda: query(prom, "airflow_scheduler_heartbeat_total"), "the first scrape")
            stamp = wait_for(
                lambda: query(prom, 'llmops:airflow_dagrun_last_success_timestamp_seconds{dag_id="tiny-llama_train"}'),
                "the last-success rule",
            )
            assert abs(float(stamp[0]["value"][1]) - time.time()) < 60
            assert not query(prom, 'llmops:airflow_dagrun_last_success_timestamp_seconds{dag_id="tiny-llama_data"}')
            # the first retrain request counts although its counter was born with it
            first = wait_for(lambda: query(prom, "llmops:airflow_retrain_requests:increase1d"), "the retrain rule")
            assert [(r["metric"]["dag_id"], r["value"][1]) for r in first] == [("tiny-llama_monitor", "1")]
            emit(udp, 2, tmp_path)  # a second retrain request, heartbeat, finished runs
            wait_for(lambda: query(prom, "llmops:airflow_retrain_requests:increase1d >= 2"), "the second request")
            runs = wait_for(
                lambda: query(prom, 'llmops:airflow_dagrun_finished:increase1h{dag_id="tiny-llama_train"} >= 2'), "runs"
            )
            assert float(runs[0]["value"][1]) == 2 and runs[0]["metric"]["state"] == "success"
            ratio = wait_for(
                lambda: query(prom, 'llmops:airflow_dagrun_failure_ratio:1d{dag_id="tiny-llama_data"}'), "failure ratio"
            )
            assert float(ratio[0]["value"][1]) == 1.0
            assert wait_for(lambda: query(prom, "llmops:airflow_scheduler_heartbeat:rate5m > 0"), "heartbeat rate")
            pools = query(prom, "llmops:airflow_pool_slots:max5m")
            assert {(p["metric"]["pool"], p["metric"]["state"]) for p in pools} == {
                ("default_pool", "open"),
                ("default_pool", "running"),
            }


def test_bad_lines_are_counted_with_a_reason_and_bad_mappings_name_the_key(tmp_path):
    from llmops_provider.statsd_exporter import MappingError, Registry, load_mapping

    registry = Registry(*load_mapping(MAPPING.read_text()))
    for line in ("no-colon", "airflow.x:1|zz", "airflow.x:abc|c", "airflow.scheduler_heartbeat:-1|c"):
        registry.handle_line(line)
    registry.handle_packet(b"\xff\xfe")
    text = registry.render()
    assert "statsd_exporter_lines_total 5" in text
    for reason in ("malformed line", "unknown metric type 'zz'", "not a number", "negative", "not UTF-8"):
        assert re.search(rf'statsd_exporter_lines_dropped_total{{reason="[^"]*{re.escape(reason)}[^"]*"}} 1', text), (
            reason
        )
    with pytest.raises(MappingError, match=r"mappings\[0\]: unknown key\(s\) \['mtch'\]"):
        load_mapping("mappings: [{mtch: a.*, name: a}]")
    with pytest.raises(MappingError, match=r"mappings\[0\].observer_type: only histogram"):
        load_mapping("mappings: [{match: a.*, name: a, observer_type: summary}]")
