"""The data stage on real engines: spark-submit on local[2], Great Expectations, the local store.

Two Spark runs in all (~1 min on 2 cores): one plain spark-submit, one through
SparkPrepareDataOperator; their outputs must be byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmops_provider import lineage
from llmops_provider.compat import AirflowFailException, Asset

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "batch-001.jsonl"
DATA_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "quarantine.jsonl", "stats.json")
SPARK_CONF = {"spark.ui.enabled": "false"}

# one line per defect the job must quarantine or fold, on top of batch-001's own
# (2 invalid_json, 1 missing_text, 1 text_not_string, 5 exact duplicates)
LOGGING_SHUTDOWN = ("Perform any cleanup actions in the logging system (e.g. flushing\nbuffers).\n\n"
                    "Should be called at application exit.")
EXTRA_LINES = [
    "   ",  # blank: counted, not quarantined
    "[1, 2, 3]",  # not_an_object
    json.dumps({"id": "tiny", "text": "too short"}),  # text_too_short (min_chars 40)
    json.dumps({"id": "huge", "text": "x" * 25_000}),  # text_too_long (max_chars 20000)
    json.dumps({"id": ["a", "list"], "text": "An id must be a scalar; a list id cannot name a document."}),  # bad_id
    json.dumps({"id": "collections", "text": "Another text that claims the id of the collections module docstring."}),
    # normalizes to logging.shutdown's text: a duplicate, and its smaller id is the one kept
    json.dumps({"id": "aaa-variant", "text": "  " + LOGGING_SHUTDOWN.replace("cleanup ", "cleanup  \t") + "\r\n"}),
    json.dumps({"id": "zz-norm", "text": " Cafe\u0301   with\ttabs\u0000 and   spaces  \r\n  second   line, long enough \x07 "}),
    json.dumps({"text": "A record without an id field still gets a stable id derived from its content."}),
]


def _recipe(path: Path, sources: Path, **data) -> Path:
    spec = {
        "name": "test-corpus",
        "data": {"sources": [{"path": str(sources)}], "min_chars": 40, "max_chars": 20000, "min_documents": 100,
                 "dataset_repo": "test-corpus", "branch": "main", **data},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("data-stage")
    landing = work / "landing"
    landing.mkdir()
    shutil.copy(SAMPLE, landing / "batch-001.jsonl")
    (landing / "extra.jsonl").write_text("\n".join(EXTRA_LINES) + "\n")
    (landing / "README.txt").write_text("not a *.jsonl file: ignored")
    return SimpleNamespace(work=work, landing=landing, recipe=_recipe(work / "recipe.yaml", landing))


def _job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}


@pytest.fixture(scope="module")
def staged(corpus) -> Path:
    """The job run the plain way: spark-submit from the control-plane venv."""
    out = corpus.work / "staged-cli"
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]"]
    for key, value in SPARK_CONF.items():
        cmd += ["--conf", f"{key}={value}"]
    cmd += [str(ROOT / "spark_jobs" / "prepare_corpus.py"), "--input", str(corpus.landing),
            "--output", str(out), "--recipe", str(corpus.recipe)]
    proc = subprocess.run(cmd, env=_job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "prepare_corpus:" in proc.stdout
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _context(run_id: str = "manual__2026-01-01T00:00:00+00:00", try_number: int = 1) -> dict:
    from airflow.sdk.execution_time.context import OutletEventAccessors

    ti = SimpleNamespace(dag_id="test-corpus_data", task_id="t", run_id=run_id, try_number=try_number)
    return {"ti": ti, "run_id": run_id, "outlet_events": OutletEventAccessors()}


def test_job_quarantines_dedups_normalizes_and_splits(staged):
    stats = json.loads((staged / "stats.json").read_text())
    assert stats["input_lines"] == 750 + len(EXTRA_LINES)
    assert stats["blank_lines"] == 1
    assert stats["quarantined_by_reason"] == {
        "bad_id": 1, "duplicate_id": 1, "invalid_json": 2, "missing_text": 1, "not_an_object": 1,
        "text_not_string": 1, "text_too_long": 1, "text_too_short": 1,
    }
    assert stats["duplicates_removed"] == 5 + 1
    assert stats["kept"] == stats["input_lines"] - 1 - 9 - 6
    assert sorted(p.name for p in staged.iterdir()) == ["_job.json", *sorted(DATA_FILES)]
    assert json.loads((staged / "_job.json").read_text())["spark_app_id"].startswith("local-")

    quarantine = _read_jsonl(staged / "quarantine.jsonl")
    assert len(quarantine) == 9 and all(set(q) == {"line", "reason", "source"} for q in quarantine)
    assert {q["line"] for q in quarantine if q["reason"] == "invalid_json"} == {
        "not json at all", '{"id": "broken-1", "text": "unterminated'}
    assert all(q["source"].endswith(("batch-001.jsonl", "extra.jsonl")) for q in quarantine)

    splits = {s: _read_jsonl(staged / f"{s}.jsonl") for s in ("train", "validation", "test")}
    for name, docs in splits.items():
        assert docs, f"{name} is empty"
        ids = [d["id"] for d in docs]
        assert ids == sorted(ids), f"{name} is not sorted by id"
        assert all(set(d) == {"id", "text"} and 40 <= len(d["text"]) <= 20000 for d in docs)
        assert stats["splits"][name] == {"docs": len(docs), "chars": sum(len(d["text"]) for d in docs)}
    all_docs = {d["id"]: d["text"] for docs in splits.values() for d in docs}
    assert len(all_docs) == stats["kept"], "an id appears in two splits"
    assert len(set(all_docs.values())) == len(all_docs), "exact duplicates survived"
    assert all_docs["zz-norm"] == "Caf\u00e9 with tabs and spaces\nsecond line, long enough"
    assert all_docs["aaa-variant"] == LOGGING_SHUTDOWN and "logging.shutdown" not in all_docs
    assert any(i.startswith("doc-") for i in all_docs)
    assert sum(s["docs"] for s in stats["splits"].values()) == stats["kept"]
    assert stats["splits"]["train"]["docs"] > 10 * stats["splits"]["test"]["docs"]


def test_operator_run_is_byte_identical_and_validates(corpus, staged, monkeypatch):
    from llmops_provider.operators.data import SparkPrepareDataOperator, ValidateDatasetOperator

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    out = corpus.work / "staged-operator"
    op = SparkPrepareDataOperator(task_id="prepare", recipe_path=str(corpus.recipe), staging_dir=str(out),
                                  spark_conf=SPARK_CONF)
    result = op.execute(_context())

    json.dumps(result)  # an XCom
    assert result["staging_dir"] == str(out) and result["spark_app_id"].startswith("local-")
    assert result["stats"] == json.loads((staged / "stats.json").read_text())
    for name in DATA_FILES:
        assert (out / name).read_bytes() == (staged / name).read_bytes(), f"{name} differs between runs"

    check = ValidateDatasetOperator(task_id="validate", recipe_path=str(corpus.recipe), staging_dir=str(out))
    verdict = check.execute(_context())
    json.dumps(verdict)
    assert verdict["success"] is True
    assert verdict["results"] and all(r["success"] for r in verdict["results"])
    assert Path(verdict["report_path"]).is_file() and (out / "_validation_report.md").is_file()


def test_validation_fails_closed_and_names_the_expectation(corpus, staged):
    from llmops_provider.operators.data import ValidateDatasetOperator

    broken = corpus.work / "broken"
    shutil.copytree(staged, broken)
    train = (broken / "train.jsonl").read_text().splitlines()
    with (broken / "test.jsonl").open("a") as fh:
        fh.write(train[0] + "\n")  # an id in two splits
    (broken / "validation.jsonl").write_text(json.dumps({"id": "short", "text": "too short"}) + "\n")

    op = ValidateDatasetOperator(task_id="validate", recipe_path=str(corpus.recipe), staging_dir=str(broken))
    with pytest.raises(AirflowFailException) as exc:
        op.execute(_context())

    message = str(exc.value)
    assert "all_splits.expect_column_values_to_be_unique(id)" in message
    assert "validation.expect_column_value_lengths_to_be_between(text)" in message
    report = json.loads((broken / "_validation_report.json").read_text())  # published before failing
    assert report["success"] is False
    assert set(report["failed"]) == {"all_splits.expect_column_values_to_be_unique(id)",
                                     "validation.expect_column_value_lengths_to_be_between(text)"}
    markdown = (broken / "_validation_report.md").read_text()
    assert "FAILED" in markdown and "**FAIL**" in markdown

    (broken / "test.jsonl").unlink()
    with pytest.raises(AirflowFailException, match=r"test\.file_exists"):
        op.execute(_context())


def test_commit_is_idempotent_and_emits_lineage(corpus, staged, monkeypatch):
    from llmops_provider.datasets import get_store
    from llmops_provider.operators.data import CommitDatasetOperator

    recorded = []  # the Airflow Variable needs a live task supervisor; the e2e tier covers the real one
    monkeypatch.setattr(CommitDatasetOperator, "_record_processed_sources", lambda self, r, fp: recorded.append((r, fp)))

    context = _context()
    # as the DAG factory declares it: events are keyed by name AND uri, so the operator must use this one
    outlet = Asset(uri=lineage.asset_uri("test-corpus", "dataset"), name="test-corpus.dataset", group="llmops")
    first = CommitDatasetOperator(task_id="commit", recipe_path=str(corpus.recipe), staging_dir=str(staged),
                                  outlets=[outlet]).execute(context)
    json.dumps(first)
    assert first["created"] is True and first["dataset_repo"] == "test-corpus" and first["branch"] == "main"
    extra = context["outlet_events"][outlet].extra
    assert extra[lineage.DATASET_COMMIT] == first["dataset_commit"]
    assert extra[lineage.DATASET_REPO] == "test-corpus" and extra[lineage.DATASET_BRANCH] == "main"
    assert extra["created"] is True and extra["kept"] == first["stats"]["kept"]

    store = get_store()
    info = store.get("test-corpus", first["dataset_commit"])
    assert info.metadata[lineage.AIRFLOW_DAG_ID] == "test-corpus_data"
    assert info.metadata[lineage.RECIPE_FINGERPRINT] and info.metadata["spark_app_id"].startswith("local-")
    assert info.metadata["stats"]["kept"] == first["stats"]["kept"]
    version = store.local_path("test-corpus", first["dataset_commit"])
    assert sorted(p.name for p in version.iterdir()) == sorted(DATA_FILES)

    # the operator's run (other spark app id, a validation report) holds the same data: no new version
    rerun_dir = corpus.work / "staged-operator"
    source = rerun_dir if rerun_dir.is_dir() else staged
    second_ctx = _context(run_id="scheduled__2026-01-02T00:00:00+00:00")
    second = CommitDatasetOperator(task_id="commit", recipe_path=str(corpus.recipe), staging_dir=str(source)).execute(second_ctx)
    assert second["created"] is False and second["dataset_commit"] == first["dataset_commit"]
    assert second_ctx["outlet_events"][Asset(lineage.asset_uri("test-corpus", "dataset"))].extra["created"] is False
    assert len(store.log("test-corpus", "main")) == 1


def test_missing_spark_connection_falls_back_to_local():
    from llmops_provider.operators.data import _find_connection, _spark_submit_hook_class

    assert _find_connection("no_such_spark_conn") is None
    hook = _spark_submit_hook_class()(conn_id="no_such_spark_conn", fallback_master="local[*]",
                                      application_args=["--output", "x"])
    cmd = hook._build_spark_submit_command("app.py")
    assert cmd[cmd.index("--master") + 1] == "local[*]"
