"""DAG-file parse time: the lifecycle DAG file versus a trivial one-task DAG, side by side.

Each sample is a fresh interpreter (as the dag-processor parses in a fresh child) that first
imports the Airflow task SDK (a cost both files share), then times only ``runpy.run_path`` of the
file. Samples alternate between the two files so machine noise hits both alike; the result is
the ratio of medians. Writes bench/results/parse_time.json.

    .venv/bin/python bench/bench_parse_time.py [--samples 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "lifecycle": ROOT / "dags" / "lifecycle.py",
    "trivial": ROOT / "bench" / "fixtures" / "trivial_dag.py",
}
PROBE = (
    "import time, runpy, sys\n"
    "import airflow.sdk\n"
    "from airflow.providers.standard.operators.empty import EmptyOperator\n"
    "t = time.perf_counter(); g = runpy.run_path(sys.argv[1]); dt = time.perf_counter() - t\n"
    "from airflow.sdk import DAG\n"
    "print(dt, len({id(v) for v in g.values() if isinstance(v, DAG)}))\n"
)


def sample(path: Path) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True, cwd=ROOT)
    seconds, dags = out.stdout.split()
    return float(seconds), int(dags)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in FILES}
    dags: dict[str, int] = {}
    for _ in range(args.samples):
        for name, path in FILES.items():
            seconds, count = sample(path)
            times[name].append(seconds)
            dags[name] = count
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "dag_file_parse_time",
        "command": f".venv/bin/python bench/bench_parse_time.py --samples {args.samples}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
        "dags_defined": dags,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "samples_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_lifecycle_vs_trivial": round(med["lifecycle"] / med["trivial"], 2),
        "ratio_per_dag": round((med["lifecycle"] / max(dags["lifecycle"], 1)) / (med["trivial"] / dags["trivial"]), 2),
    }
    out = ROOT / "bench" / "results" / "parse_time.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
