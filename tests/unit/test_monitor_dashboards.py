"""Prometheus rules and the Grafana dashboard: valid, tested, and wired to each other.

promtool (Debian's prometheus package) parses every rule and every dashboard expression and
runs the alert unit tests in deploy/prometheus/rules_test.yml; it is a sub-second parser, so
these stay in the unit tier.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
MAPPING = ROOT / "deploy" / "prometheus" / "statsd-mapping.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "llmops-vllm.json"
LIFECYCLE = ROOT / "deploy" / "grafana" / "llmops-lifecycle.json"
# each dashboard: the recording rules it must show all of, and its template variables
DASHBOARDS = {
    DASHBOARD: ("llmops:vllm_", {"datasource", "model_name"}),
    LIFECYCLE: ("llmops:airflow_", {"datasource", "recipe"}),
}
# raw series a panel may use besides the recording rules (all of them exported by a real component)
RAW_SERIES = {"up", "ALERTS", "DCGM_FI_DEV_GPU_UTIL"}


def promtool() -> str:
    binary = shutil.which("promtool")
    if not binary:
        pytest.fail("promtool not installed: run `make setup` (apt-get install prometheus ships it)")
    return binary


def recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    dash = json.loads(path.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_rules_parse():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_unit_tests_pass():
    out = subprocess.run(
        [promtool(), "test", "rules", "rules_test.yml"], cwd=RULES.parent, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("path", list(DASHBOARDS), ids=lambda p: p.name)
def test_every_dashboard_expression_parses(tmp_path, path):
    exprs = dashboard_exprs(path)
    assert len(exprs) >= 10
    # promtool has no bare "parse this expression": each becomes a recording rule of a scratch file
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e.replace("$model_name", ".*").replace("$recipe", ".+")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # and a broken one is caught, so the check above can fail
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum("}]}]}))
    assert subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True).returncode != 0


@pytest.mark.parametrize("path", list(DASHBOARDS), ids=lambda p: p.name)
def test_dashboard_uses_existing_recording_rules(path):
    known = recorded()
    prefix = DASHBOARDS[path][0]
    used = set()
    for expr in dashboard_exprs(path):
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[)]|\s*$)", expr)) - {"by", "sum", "avg", "max"}
        series = {n for n in names if ":" in n or n in RAW_SERIES or n.isupper()}
        assert series, f"no series found in {expr!r}"
        for name in series:
            assert name in known or name in RAW_SERIES, f"{expr!r} uses {name}, which no recording rule defines"
        used |= series
    # every recording rule of the dashboard's family is on it
    assert {n for n in known if n.startswith(prefix)} - used == set()
    assert {n for n in known if n.startswith(prefix)}


@pytest.mark.parametrize("path", list(DASHBOARDS), ids=lambda p: p.name)
def test_dashboard_is_importable_grafana_json(path):
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == DASHBOARDS[path][1]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    assert len({json.loads(p.read_text())["uid"] for p in DASHBOARDS}) == len(DASHBOARDS)


def test_lifecycle_rules_read_only_series_the_statsd_mapping_produces():
    """Every raw airflow_* series the rules use is a `name` of deploy/prometheus/statsd-mapping.yml."""
    from llmops_provider.statsd_exporter import load_mapping

    mappings, _ = load_mapping(MAPPING.read_text())
    produced = {m.name for m in mappings if m.action != "drop"}
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    raw = set()
    for expr in exprs:
        for name in re.findall(r"(?<![:\w])airflow_[a-z_]+", expr):
            raw.add(re.sub(r"_(bucket|count|sum)$", "", name))
    assert raw and raw <= produced, f"rules read {sorted(raw - produced)}, which no mapping produces"
