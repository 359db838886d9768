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
DASHBOARD = ROOT / "deploy" / "grafana" / "llmops-vllm.json"
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


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_rules_parse():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_unit_tests_pass():
    out = subprocess.run(
        [promtool(), "test", "rules", "rules_test.yml"], cwd=RULES.parent, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_dashboard_expression_parses(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    # promtool has no bare "parse this expression": each becomes a recording rule of a scratch file
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e.replace("$model_name", ".*")}
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


def test_dashboard_uses_existing_recording_rules():
    known = recorded()
    used = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[)]|\s*$)", expr)) - {"by", "sum", "avg", "max"}
        series = {n for n in names if ":" in n or n in RAW_SERIES or n.isupper()}
        assert series, f"no series found in {expr!r}"
        for name in series:
            assert name in known or name in RAW_SERIES, f"{expr!r} uses {name}, which no recording rule defines"
        used |= series
    # every vLLM recording rule is on the dashboard
    assert known - used == set()


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "model_name"}
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
