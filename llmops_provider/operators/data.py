"""Data-stage operators: prepare a corpus with Spark, validate it, commit it as a dataset version.

``prepare`` -> ``validate`` -> ``commit`` share one staging directory per DAG run; the
commit is content-addressed, so re-running on unchanged data creates no new version.
Heavy engines (pyspark, great_expectations) are imported inside ``execute`` only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from llmops_provider import config, lineage
from llmops_provider.compat import AirflowFailException, Asset, BaseHook, BaseOperator
from llmops_provider.recipes import DataSpec, expand, load_recipe
from llmops_provider.spark_local import local_defaults

SPLITS = ("train", "validation", "test")
STATS_FILE = "stats.json"
JOB_FILE = "_job.json"  # '_' keeps run provenance out of the committed tree
REPORT_JSON = "_validation_report.json"
REPORT_MD = "_validation_report.md"
DATA_CARD_JSON = "data_card.json"  # written by the job next to the data: committed with the version
DATA_CARD_MD = "data_card.md"
SOURCE_FILE = "_source.json"  # fingerprint of the raw sources as read: the monitor's "new data" check
LOCAL_FALLBACK_MASTER = "local[*]"

# the Spark application ships inside the provider (a checkout, an editable or a wheel install)
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
DEFAULT_APPLICATION = Path(__file__).resolve().parents[1] / "data" / "prepare_corpus.py"


def default_staging_dir(recipe_name: str, run_id: str) -> Path:
    """``[llmops] home``/staging/<recipe>/<run_id with only [A-Za-z0-9._-]>."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "manual"
    return config.home() / "staging" / recipe_name / safe


def _run_id(context) -> str:
    run_id = context.get("run_id")
    if run_id is None and context.get("ti") is not None:
        run_id = context["ti"].run_id
    return str(run_id or "manual")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AirflowFailException(
            f"{path} is missing: {what}. Is staging_dir the directory the prepare task wrote?"
        ) from None


# --------------------------------------------------------------------------- prepare


def _spark_submit_hook_class():
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    class _SparkSubmitHook(SparkSubmitHook):
        """SparkSubmitHook that can run without a connection on an explicit master."""

        def __init__(self, *args: Any, fallback_master: str | None = None, **kwargs: Any) -> None:
            self._fallback_master = fallback_master
            super().__init__(*args, **kwargs)

        def _resolve_connection(self) -> dict[str, Any]:
            resolved = super()._resolve_connection()
            if self._fallback_master:
                resolved["master"] = self._fallback_master
            return resolved

    return _SparkSubmitHook


def _find_connection(conn_id: str):
    """The Airflow connection, or None when it is not defined (other lookup errors propagate)."""
    try:
        return BaseHook.get_connection(conn_id)
    except Exception as exc:
        # airflow.exceptions and airflow.sdk.exceptions each define one; match both by name
        if any(cls.__name__ == "AirflowNotFoundException" for cls in type(exc).__mro__):
            return None
        raise


class SparkPrepareDataOperator(BaseOperator):
    """Run ``llmops_provider/data/prepare_corpus.py`` with spark-submit: parse, quarantine, normalize, dedup, split.

    The Spark master is the host of the recipe's ``data.spark_conn_id`` connection
    (``local[2]`` locally, ``spark://``/``k8s://``/``yarn`` in production); when that
    connection does not exist the job runs on ``local[*]``.

    :param recipe_path: path of the recipe YAML; its ``data`` section drives the job (templated)
    :param input_paths: JSONL files or directories to read; default the recipe's
        ``data.sources`` with ``{home}`` expanded (templated)
    :param staging_dir: directory the job (re)writes; default
        ``[llmops] home``/staging/<recipe>/<run_id> (templated)
    :param conn_id: Spark connection id overriding ``data.spark_conn_id`` (templated)
    :param application: the PySpark application to submit; default the installed provider's
        ``llmops_provider/data/prepare_corpus.py``
    :param spark_conf: extra ``--conf`` properties for spark-submit
    :return: ``{staging_dir, stats, spark_app_id}``
    """

    template_fields: Sequence[str] = ("recipe_path", "input_paths", "staging_dir", "conn_id")

    def __init__(
        self,
        *,
        recipe_path: str,
        input_paths: list[str] | str | None = None,
        staging_dir: str | None = None,
        conn_id: str | None = None,
        application: str | None = None,
        spark_conf: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.input_paths = input_paths
        self.staging_dir = staging_dir
        self.conn_id = conn_id
        self.application = application
        self.spark_conf = spark_conf
        self._hook = None

    def _inputs(self, data: DataSpec) -> list[str]:
        if self.input_paths:
            return [self.input_paths] if isinstance(self.input_paths, str) else [str(p) for p in self.input_paths]
        home = config.home()
        return [expand(src.path, home) for src in data.sources]

    def _resolve_inputs(self, sources: list[str]) -> tuple[list[str], str | None]:
        """Local sources -> the exact ``*.jsonl`` files to read, and their fingerprint.

        Spark gets the file list, not the directories, so the fingerprint recorded with the commit
        (the monitor's "new data" check) is of exactly what this run read, even when files land
        while it runs. Remote URIs (``s3a://``) pass through unfingerprinted.
        """
        from llmops_provider.monitoring import fingerprint_files, source_files

        local = [p for p in sources if "://" not in p]
        remote = [p for p in sources if "://" in p]
        files = source_files(local)
        if local and not files and not remote:
            raise AirflowFailException(
                f"no *.jsonl files in the data sources {local}: land raw data there first "
                "(recipe field data.sources), or fix the path"
            )
        fingerprint = fingerprint_files(files) if local and not remote else None
        return [str(path) for _, path in files] + remote, fingerprint

    def _spark_binary(self, conn) -> str | None:
        """The control plane's own spark-submit (pyspark's), unless the connection names one."""
        if conn is not None and conn.extra_dejson.get("spark-binary"):
            return None
        candidate = Path(sys.executable).parent / "spark-submit"
        if candidate.exists():
            return str(candidate)
        found = shutil.which("spark-submit")
        if found is None:
            raise AirflowFailException(
                "spark-submit not found next to the Python interpreter or on PATH; install pyspark "
                "into the Airflow environment (extra `data`) or set the connection extra `spark-binary`"
            )
        return found

    def _job_env(self, master: str) -> dict[str, str]:
        env = {
            # the job imports llmops_provider.recipes; the driver and its Python workers must
            # run this interpreter, which has pyspark and the provider installed
            "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p),
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
        }
        if master.startswith("local") and "SPARK_LOCAL_IP" not in os.environ:
            env["SPARK_LOCAL_IP"] = "127.0.0.1"  # no guessing of a routable interface on a laptop/worker
        return env

    def execute(self, context) -> dict[str, Any]:
        recipe = load_recipe(self.recipe_path)
        data = recipe.data
        application = Path(self.application) if self.application else DEFAULT_APPLICATION
        if not application.is_file():
            raise AirflowFailException(
                f"Spark application {application} not found; pass application= or reinstall the provider "
                f"(its wheel ships llmops_provider/data/prepare_corpus.py)"
            )
        staging = Path(self.staging_dir) if self.staging_dir else default_staging_dir(recipe.name, _run_id(context))
        inputs, fingerprint = self._resolve_inputs(self._inputs(data))
        conn_id = self.conn_id or data.spark_conn_id

        conn = _find_connection(conn_id)
        fallback = None
        if conn is None:
            fallback = LOCAL_FALLBACK_MASTER
            self.log.info("Spark connection %r is not defined: running on %s", conn_id, fallback)
        master = fallback or (conn.host or "")

        args: list[str] = []
        for path in inputs:
            args += ["--input", path]
        args += ["--output", str(staging), "--recipe", str(Path(self.recipe_path).resolve())]
        hook_cls = _spark_submit_hook_class()
        self._hook = hook_cls(
            conn_id=conn_id,
            fallback_master=fallback,
            conf=local_defaults(master, {"spark.ui.showConsoleProgress": "false", **(self.spark_conf or {})}),
            name=f"llmops-prepare-{recipe.name}",
            application_args=args,
            env_vars=self._job_env(master),
            spark_binary=self._spark_binary(conn),
        )
        self.log.info("Preparing %s from %s into %s", recipe.name, inputs, staging)
        self._hook.submit(str(application))
        (staging / SOURCE_FILE).write_text(json.dumps({"source_fingerprint": fingerprint, "inputs": inputs}))

        stats = _read_json(staging / STATS_FILE, "the Spark job did not write its stats")
        job = _read_json(staging / JOB_FILE, "the Spark job did not write its run record")
        self.log.info(
            "Prepared %s: %s input lines -> %s kept, %s excluded %s, %s quarantined %s; splits %s (app %s)",
            recipe.name,
            stats["input_lines"],
            stats["kept"],
            stats.get("excluded"),
            stats.get("excluded_by_step"),
            stats["quarantined"],
            stats["quarantined_by_reason"],
            stats["splits"],
            job.get("spark_app_id"),
        )
        card = staging / DATA_CARD_MD
        if card.is_file():
            self.log.info("Data card (%s):\n%s", card, card.read_text())
        return {"staging_dir": str(staging), "stats": stats, "spark_app_id": job.get("spark_app_id")}

    def on_kill(self) -> None:
        if self._hook is not None:
            self._hook.on_kill()


# --------------------------------------------------------------------------- validate


def _load_split(path: Path) -> tuple[list[dict[str, Any]], int]:
    rows, bad = [], 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict):
                rows.append(record)
            else:
                bad += 1
    return rows, bad


def _short(value: Any, limit: int = 80) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _result_row(scope: str, res) -> dict[str, Any]:
    """One GE expectation result as a small JSON-safe dict (XCom-sized)."""
    cfg = res.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    result = res.result or {}
    error = None
    for info in (res.exception_info or {}).values():
        if isinstance(info, dict) and info.get("raised_exception"):
            error = info.get("exception_message")
            break
    if error is None and isinstance(res.exception_info, dict) and res.exception_info.get("raised_exception"):
        error = res.exception_info.get("exception_message")
    return {
        "scope": scope,
        "expectation": cfg.type,
        "column": kwargs.pop("column", None),
        "kwargs": kwargs,
        "success": bool(res.success),
        "observed": result.get("observed_value"),
        "unexpected_count": result.get("unexpected_count"),
        "examples": [_short(v) for v in (result.get("partial_unexpected_list") or [])[:3]],
        "error": error,
    }


def _check_row(scope: str, name: str, success: bool, observed: Any) -> dict[str, Any]:
    return {
        "scope": scope,
        "expectation": name,
        "column": None,
        "kwargs": {},
        "success": success,
        "observed": observed,
        "unexpected_count": None,
        "examples": [],
        "error": None,
    }


def validate_dataset_dir(staging: Path, data: DataSpec) -> dict[str, Any]:
    """Run the data gate over ``staging`` with Great Expectations; returns the report dict."""
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
        mode="ephemeral",
    )
    source = context.data_sources.add_pandas("llmops_staging")
    E = gx.expectations
    results: list[dict[str, Any]] = []
    frames = []

    def run(scope: str, frame, expectations) -> None:
        suite = context.suites.add(gx.ExpectationSuite(name=f"llmops_{scope}", expectations=expectations))
        batch_def = source.add_dataframe_asset(name=scope).add_batch_definition_whole_dataframe("all")
        outcome = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        results.extend(_result_row(scope, r) for r in outcome.results)

    for split in SPLITS:
        path = staging / f"{split}.jsonl"
        if not path.is_file():
            results.append(_check_row(split, "file_exists", False, f"{path.name} missing"))
            rows, bad = [], 0
        else:
            rows, bad = _load_split(path)
            results.append(_check_row(split, "lines_parse_as_json_objects", bad == 0, f"{bad} unparseable lines"))
        frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["id", "text"])
        min_rows = data.min_documents if split == "train" else 1
        run(
            split,
            frame,
            [
                E.ExpectColumnToExist(column="id"),
                E.ExpectColumnToExist(column="text"),
                E.ExpectColumnValuesToNotBeNull(column="id"),
                E.ExpectColumnValuesToNotBeNull(column="text"),
                E.ExpectColumnValueLengthsToBeBetween(
                    column="text", min_value=data.min_chars, max_value=data.max_chars
                ),
                E.ExpectTableRowCountToBeBetween(min_value=min_rows),
            ],
        )
        if "id" in frame.columns:
            frames.append(frame[["id"]].assign(split=split))

    all_ids = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "split"])
    run(
        "all_splits",
        all_ids.astype({"id": str}) if len(all_ids) else all_ids,
        [E.ExpectColumnValuesToBeUnique(column="id")],
    )
    results.extend(_proportion_checks(all_ids, data))

    excluded_path = staging / "excluded.jsonl"
    if excluded_path.is_file():
        rows, bad = _load_split(excluded_path)
        frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["id", "step", "reason", "text"])
        run("excluded", frame, [E.ExpectColumnValuesToNotBeNull(column=c) for c in ("id", "step", "reason")])
    stats_path = staging / STATS_FILE
    if stats_path.is_file():
        results.append(_accounting_check(json.loads(stats_path.read_text())))
    if (staging / "packed" / "manifest.json").is_file():
        results.append(_packed_check(staging))

    failed = [r for r in results if not r["success"]]
    return {
        "staging_dir": str(staging),
        "success": not failed,
        "evaluated": len(results),
        "failed": [_failure_name(r) for r in failed],
        "thresholds": {"min_chars": data.min_chars, "max_chars": data.max_chars, "min_documents": data.min_documents},
        "results": results,
    }


def _proportion_checks(all_ids, data: DataSpec) -> list[dict[str, Any]]:
    """Each split's share of the kept documents is near the recipe's (binomial tolerance, at least 5 points)."""
    n = len(all_ids)
    out = []
    for split, expected in data.splits.items():
        observed = float((all_ids["split"] == split).sum()) / n if n else 0.0
        tolerance = max(0.05, 4 * (expected * (1 - expected) / max(n, 1)) ** 0.5)
        ok = n > 0 and abs(observed - expected) <= tolerance
        out.append(_check_row(split, "split_proportion", ok, f"{observed:.3f} (recipe {expected}, +-{tolerance:.3f})"))
    return out


def _accounting_check(stats: dict[str, Any]) -> dict[str, Any]:
    """input = blank + quarantined + excluded + kept, and every step's in - out = its drops."""
    steps = stats.get("steps") or []
    total = sum(stats.get(k, 0) or 0 for k in ("blank_lines", "quarantined", "excluded", "kept"))
    chain = all(a["out"] == b["in"] for a, b in pairwise(steps))
    per_step = all(s["in"] - s["out"] == sum(s["dropped"].values()) for s in steps)
    ok = total == stats.get("input_lines") and chain and per_step and (not steps or steps[-1]["out"] == stats["kept"])
    return _check_row("stats", "records_accounted_for", ok, f"{stats.get('input_lines')} input lines, {total} outcomes")


def _packed_check(staging: Path) -> dict[str, Any]:
    """Packed shards match their manifest: shapes, block counts, token ids below the vocabulary size."""
    import numpy as np

    manifest = json.loads((staging / "packed" / "manifest.json").read_text())
    problems = []
    for split, info in manifest["splits"].items():
        blocks = 0
        for rel in info["files"]:
            arr = np.load(staging / rel, mmap_mode="r")
            blocks += arr.shape[0]
            if arr.shape[1] != manifest["seq_len"] or (arr.size and int(arr.max()) >= manifest["vocab_size"]):
                problems.append(f"{rel}: shape {arr.shape} or token ids >= vocab_size {manifest['vocab_size']}")
        if blocks != info["blocks"] or info["tokens"] != blocks * manifest["seq_len"]:
            problems.append(f"{split}: {blocks} blocks on disk, manifest says {info['blocks']}")
    if not manifest["splits"].get("train", {}).get("blocks"):
        problems.append("train has no full block: lower training.seq_len or add data")
    return _check_row("packed", "manifest_matches_shards", not problems, "; ".join(problems) or "ok")


def _failure_name(r: dict[str, Any]) -> str:
    column = f"({r['column']})" if r["column"] else ""
    return f"{r['scope']}.{r['expectation']}{column}"


def render_markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["success"] else "FAILED"
    lines = [
        f"# Data validation: {verdict}",
        "",
        f"Staging directory: `{report['staging_dir']}`  ",
        f"Expectations: {report['evaluated']} evaluated, {len(report['failed'])} failed  ",
        f"Thresholds: {report['thresholds']}",
        "",
        "| scope | expectation | column | result | observed / unexpected |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        detail = r["error"] or (
            f"{r['unexpected_count']} unexpected, e.g. {r['examples']}" if r["unexpected_count"] else r["observed"]
        )
        detail = str(detail if detail is not None else "").replace("|", "\\|").replace("\n", " ")
        mark = "pass" if r["success"] else "**FAIL**"
        bounds = " ".join(f"{k}={v}" for k, v in r["kwargs"].items() if v is not None)
        name = f"{r['expectation']} ({bounds})" if bounds else r["expectation"]
        lines.append(f"| {r['scope']} | {name} | {r['column'] or ''} | {mark} | {detail} |")
    return "\n".join(lines) + "\n"


class ValidateDatasetOperator(BaseOperator):
    """The data gate: Great Expectations over the staged splits; publishes its report, then passes or fails.

    Checks each split has ``id``/``text`` columns without nulls, text lengths within
    ``data.min_chars``..``data.max_chars``, at least one document (``data.min_documents``
    in train), and that no id appears twice across the splits. The report is written to
    ``_validation_report.json`` and ``_validation_report.md`` in the staging directory and
    summarized in the log before the task passes or raises ``AirflowFailException``.

    :param recipe_path: path of the recipe YAML (templated)
    :param staging_dir: the directory the prepare task wrote, e.g.
        ``{{ ti.xcom_pull(task_ids='prepare')['staging_dir'] }}`` (templated)
    :return: ``{success, report_path, results}``
    """

    template_fields: Sequence[str] = ("recipe_path", "staging_dir")

    def __init__(self, *, recipe_path: str, staging_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.staging_dir = staging_dir

    def execute(self, context) -> dict[str, Any]:
        recipe = load_recipe(self.recipe_path)
        staging = Path(self.staging_dir)
        if not staging.is_dir():
            raise AirflowFailException(f"staging_dir {staging} does not exist; point it at the prepare task's output")
        report = validate_dataset_dir(staging, recipe.data)
        report_path = staging / REPORT_JSON
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        (staging / REPORT_MD).write_text(render_markdown(report))

        self.log.info(
            "Data validation of %s: %s (%d expectations, %d failed); report %s",
            staging,
            "PASSED" if report["success"] else "FAILED",
            report["evaluated"],
            len(report["failed"]),
            report_path,
        )
        for r in report["results"]:
            if not r["success"]:
                self.log.error("  FAILED %s: %s", _failure_name(r), r["error"] or r["observed"] or r["examples"])
        if not report["success"]:
            raise AirflowFailException(
                f"data validation failed for {staging}: {', '.join(report['failed'])}; report: {report_path}"
            )
        return {"success": True, "report_path": str(report_path), "results": report["results"]}


# --------------------------------------------------------------------------- commit


def _card_summary(staging: Path) -> dict[str, Any] | None:
    """The data card, small enough for an asset event extra: per-step drops, clusters, tokens."""
    path = staging / DATA_CARD_JSON
    if not path.is_file():
        return None
    card = json.loads(path.read_text())
    return {
        "records": card["records"],
        "steps": {s["step"]: {"in": s["in"], "out": s["out"], "dropped": s["dropped"]} for s in card["steps"]},
        "dedup_clusters": (card.get("dedup_clusters") or {}).get("clusters"),
        "tokens": {k: v.get("document_tokens") for k, v in (card.get("tokens") or {}).items()} or None,
        "file": DATA_CARD_MD,
    }


class CommitDatasetOperator(BaseOperator):
    """Commit the staged dataset to ``data.dataset_repo``@``data.branch`` and emit the dataset asset event.

    Committing a tree identical to the branch head creates nothing and returns the head
    (``created: False``), so re-running the data DAG on unchanged input adds no version.
    The asset event extra carries the lineage keys (``dataset_repo``, ``dataset_commit``,
    ``dataset_branch``) for the training DAG.

    :param recipe_path: path of the recipe YAML (templated)
    :param staging_dir: the directory the prepare task wrote (templated)
    :return: ``{dataset_repo, dataset_commit, branch, created, stats}``
    """

    template_fields: Sequence[str] = ("recipe_path", "staging_dir")

    def __init__(self, *, recipe_path: str, staging_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.staging_dir = staging_dir

    def _dataset_asset(self, recipe_name: str):
        """The declared outlet with the dataset URI (events are keyed by name and URI), else ``Asset(uri)``."""
        uri = lineage.asset_uri(recipe_name, "dataset")
        for outlet in self.outlets or ():
            if isinstance(outlet, Asset) and outlet.uri == uri:
                return outlet
        return Asset(uri)

    def _record_processed_sources(self, recipe_name: str, fingerprint: str) -> None:
        """Mark the raw sources processed, even when nothing changed: the monitor must not ask again."""
        from llmops_provider.compat import Variable

        Variable.set(lineage.processed_sources_variable(recipe_name), fingerprint)

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider.datasets import get_store

        recipe = load_recipe(self.recipe_path)
        data = recipe.data
        staging = Path(self.staging_dir)
        stats = _read_json(staging / STATS_FILE, "nothing to commit")
        job = json.loads((staging / JOB_FILE).read_text()) if (staging / JOB_FILE).is_file() else {}
        validation = json.loads((staging / REPORT_JSON).read_text()) if (staging / REPORT_JSON).is_file() else None
        source = json.loads((staging / SOURCE_FILE).read_text()) if (staging / SOURCE_FILE).is_file() else {}

        metadata = {
            **lineage.airflow_ids(context),
            lineage.RECIPE_NAME: recipe.name,
            lineage.RECIPE_FINGERPRINT: recipe.fingerprint(),
            "spark_app_id": job.get("spark_app_id"),
            "source_fingerprint": source.get("source_fingerprint"),
            "stats": stats,
            "validation": None
            if validation is None
            else {"success": validation["success"], "failed": validation["failed"]},
        }
        from llmops_provider.datasets.base import DatasetStoreError

        store = get_store()
        try:
            info = store.commit(data.dataset_repo, data.branch, staging, metadata)
        except DatasetStoreError as exc:
            if type(exc).__name__ == "DatasetGateFailed":  # a pre-merge hook said no: a gate, not a glitch
                raise AirflowFailException(f"dataset not published: {exc}") from exc
            raise
        if source.get("source_fingerprint"):
            self._record_processed_sources(recipe.name, source["source_fingerprint"])
        if info.created:
            self.log.info(
                "Committed %s@%s: %s (parent %s)", data.dataset_repo, data.branch, info.commit_id, info.parent
            )
        else:
            self.log.info(
                "Data unchanged: %s@%s stays at %s (committed by run %s)",
                data.dataset_repo,
                data.branch,
                info.commit_id,
                info.metadata.get(lineage.AIRFLOW_RUN_ID),
            )

        extra = {
            lineage.DATASET_REPO: data.dataset_repo,
            lineage.DATASET_COMMIT: info.commit_id,
            lineage.DATASET_BRANCH: data.branch,
            lineage.RECIPE_NAME: recipe.name,
            lineage.RECIPE_FINGERPRINT: recipe.fingerprint(),
            "created": info.created,
            "kept": stats.get("kept"),
            "quarantined": stats.get("quarantined"),
            "duplicates_removed": stats.get("duplicates_removed"),
            "excluded": stats.get("excluded"),
            "splits": {name: split.get("docs") for name, split in stats.get("splits", {}).items()},
            "data_card": _card_summary(staging),
        }
        outlet_events = context.get("outlet_events")
        if outlet_events is not None:
            outlet_events[self._dataset_asset(recipe.name)].extra = extra
        return {
            "dataset_repo": data.dataset_repo,
            "dataset_commit": info.commit_id,
            "branch": data.branch,
            "created": info.created,
            "stats": stats,
        }
