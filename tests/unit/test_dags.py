"""Every DAG file imports cleanly, links the lifecycle by Assets, and stays light at parse time."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
HEAVY = [
    "torch",
    "pyspark",
    "mlflow",
    "great_expectations",
    "kubernetes",
    "lakefs_sdk",
    "lm_eval",
    "vllm",
    "transformers",
    "deepspeed",
    "peft",
]
STAGES = ["data", "train", "evaluate", "deploy", "monitor"]


@pytest.fixture(scope="module")
def dagbag():
    from llmops_provider.compat import dagbag_class

    DagBag = dagbag_class()

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_lifecycle_dags_per_recipe(dagbag):
    for stage in STAGES:
        assert f"tiny-llama_{stage}" in dagbag.dags
    assert "example_finetune" in dagbag.dags


def test_stages_are_linked_by_assets(dagbag):
    def uris(objs):
        return {getattr(o, "uri", None) for o in objs}

    train = dagbag.dags["tiny-llama_train"]
    data = dagbag.dags["tiny-llama_data"]
    # only a NEW dataset version is published (unchanged data short-circuits before `publish`)
    assert uris(data.get_task("publish").outlets) == {"llmops://tiny-llama/dataset"}
    assert data.get_task("publish").upstream_task_ids == {"commit", "needs_training"}
    assert "llmops://tiny-llama/dataset" in str(train.timetable.asset_condition)
    assert uris(train.get_task("train").outlets) == {"llmops://tiny-llama/model"}
    assert uris(dagbag.dags["tiny-llama_evaluate"].get_task("evaluate").outlets) == {"llmops://tiny-llama/approved"}
    assert uris(dagbag.dags["tiny-llama_deploy"].get_task("deploy").outlets) == {"llmops://tiny-llama/deployment"}
    assert uris(dagbag.dags["tiny-llama_monitor"].get_task("request_retrain").outlets) == {
        "llmops://tiny-llama/retrain"
    }
    # the data DAG runs nightly OR when the monitor asks for a retrain
    data_tt = dagbag.dags["tiny-llama_data"].timetable
    assert "llmops://tiny-llama/retrain" in str(data_tt.asset_condition)


def test_dag_files_import_nothing_heavy():
    """Parse-time rule: DAG files (and the provider modules they load) import no engine."""
    files = sorted(str(p) for p in DAGS.glob("*.py"))
    code = (
        "import runpy, sys, json\n"
        f"for f in {files!r}:\n"
        "    runpy.run_path(f)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_invalid_recipe_is_an_import_error_naming_file_field_and_fix(tmp_path, monkeypatch):
    from llmops_provider.compat import dagbag_class

    DagBag = dagbag_class()

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(DAGS / "recipes" / "tiny-llama.yaml", recipes / "good.yaml")
    bad = yaml.safe_load((DAGS / "recipes" / "tiny-llama.yaml").read_text())
    bad["name"] = "broken-one"
    bad["training"]["learning_rate"] = -1
    (recipes / "broken.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.setenv("AIRFLOW__LLMOPS__RECIPES_DIR", str(recipes))
    bag = DagBag(dag_folder=str(DAGS))
    errors = {Path(k).name: v for k, v in bag.import_errors.items()}
    assert set(errors) == {"recipe_errors.py"}
    msg = errors["recipe_errors.py"]
    assert "broken.yaml" in msg and "`training.learning_rate`" in msg and "greater than 0" in msg
    # the valid recipe's DAGs still load
    assert "tiny-llama_train" in bag.dags
    assert not any(d.startswith("broken-one") for d in bag.dags)
