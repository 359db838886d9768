"""Example: one DAG file of your own, using the provider's operators directly.

Data prep, dataset commit, LoRA fine-tune and the eval gate in a single DAG, wired by XCom instead
of Assets. Copy it, point RECIPE at your recipe, and trigger it from the UI. (This file is loaded
by the test suite and shown in the README.)
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from airflow.sdk import DAG

from llmops_provider.operators.data import CommitDatasetOperator, SparkPrepareDataOperator, ValidateDatasetOperator
from llmops_provider.operators.evaluation import LMEvalGateOperator
from llmops_provider.operators.training import DeepSpeedTrainOperator

RECIPE = str(Path(__file__).parent / "recipes" / "tiny-llama.yaml")
STAGING = "{{ ti.xcom_pull(task_ids='prepare')['staging_dir'] }}"

with DAG(
    "example_finetune",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    tags=["llmops", "example"],
):
    prepare = SparkPrepareDataOperator(task_id="prepare", recipe_path=RECIPE)
    validate = ValidateDatasetOperator(task_id="validate", recipe_path=RECIPE, staging_dir=STAGING)
    commit = CommitDatasetOperator(task_id="commit", recipe_path=RECIPE, staging_dir=STAGING)
    train = DeepSpeedTrainOperator(
        task_id="train",
        recipe_path=RECIPE,
        dataset_commit="{{ ti.xcom_pull(task_ids='commit')['dataset_commit'] }}",
    )
    evaluate = LMEvalGateOperator(
        task_id="evaluate",
        recipe_path=RECIPE,
        model_version="{{ ti.xcom_pull(task_ids='train')['model_version'] }}",
    )
    prepare >> validate >> commit >> train >> evaluate
