"""The provider as a built wheel: it ships the data pipeline, and the data operator runs it from there.

``uv build`` makes the wheel the control-plane image installs; it is installed (not editable)
into a folder that comes first on ``PYTHONPATH``, so the checkout is not what gets imported.
The real ``SparkPrepareDataOperator`` then finds its Spark application inside that install and
runs it on ``local[1]`` over the sample corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.integration
PIPELINE = {"prepare_corpus", "steps", "minhash", "language", "tokenization", "data_card"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH: run `make setup` (deploy/local/setup.sh installs it)"
    source = tmp_path_factory.mktemp("source")
    # build from a copy of the tracked files: the build must not depend on (or write into) the checkout
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([uv, "build", "--wheel", "--out-dir", str(dist), str(source)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = dist.glob("airflow_provider_llmops-*.whl")
    return built


def test_the_wheel_ships_the_data_pipeline(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"llmops_provider/data/{m}.py" for m in PIPELINE} <= names
    assert "llmops_provider/data/__init__.py" in names
    assert not any(n.startswith("spark_jobs/") for n in names)  # the checkout's entrypoint stays out
    assert any(n.startswith("llmops_provider/evaluation/prompts/") and n.endswith(".jsonl") for n in names)


def test_the_data_operator_runs_its_spark_application_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([shutil.which("uv"), "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = tmp_path / "tiny-llama.yaml"
    shutil.copy(ROOT / "dags" / "recipes" / "tiny-llama.yaml", recipe)
    out = tmp_path / "staged"
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from types import SimpleNamespace
        import llmops_provider
        from llmops_provider.operators import data
        print(json.dumps({{"package": llmops_provider.__file__, "application": str(data.DEFAULT_APPLICATION)}}))
        from airflow.sdk.execution_time.context import OutletEventAccessors
        ti = SimpleNamespace(dag_id="tiny-llama_data", task_id="prepare", run_id="manual__wheel", try_number=1)
        op = data.SparkPrepareDataOperator(task_id="prepare", recipe_path={str(recipe)!r}, staging_dir={str(out)!r},
                                           input_paths=[{str(ROOT / "data" / "sample")!r}])
        result = op.execute({{"ti": ti, "run_id": "manual__wheel", "outlet_events": OutletEventAccessors()}})
        print(json.dumps({{"kept": result["stats"]["kept"], "spark_app_id": result["spark_app_id"]}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({
        "PYTHONPATH": str(site),
        "AIRFLOW__LLMOPS__HOME": str(tmp_path / "home"),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[1]"}),
        "SPARK_LOCAL_IP": "127.0.0.1",
    })  # fmt: skip
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    where, result = lines[0], lines[-1]
    # imported from the wheel's install, not the checkout, and the application is the wheel's file
    assert Path(where["package"]).resolve().is_relative_to(site.resolve()), where
    assert Path(where["application"]).resolve() == (site / "llmops_provider" / "data" / "prepare_corpus.py").resolve()
    assert result["kept"] > 0 and result["spark_app_id"]
    assert (out / "train.jsonl").stat().st_size > 0 and (out / "stats.json").is_file()
