"""The data stage on real engines: spark-submit on local[2], Great Expectations, the local store.

Three Spark runs in all (~1.5 min on 2 cores): one plain spark-submit, one through
SparkPrepareDataOperator (their outputs must be byte-identical: the same input gives the same
dataset version), and one killed midway (the previous output stays as it was).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmops_provider import lineage
from llmops_provider.compat import AirflowFailException, Asset
from llmops_provider.datasets import tree_hash
from llmops_provider.spark_local import LOCAL_DRIVER_JAVA_OPTIONS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "batch-001.jsonl"
DATA_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "quarantine.jsonl", "excluded.jsonl", "stats.json",
              "data_card.json", "data_card.md", "length_histogram.png")  # fmt: skip
VERSION_ENTRIES = sorted([*DATA_FILES, "packed", "tokenizer"])
SPARK_CONF = {"spark.ui.enabled": "false"}

LOGGING_SHUTDOWN = (
    "Perform any cleanup actions in the logging system (e.g. flushing\nbuffers).\n\n"
    "Should be called at application exit."
)
PROSE = (
    "The scheduler reads every DAG file and creates the runs that are due. Each task of a run is sent to the "
    "executor, which starts it in a worker process and reports the state back to the database. When a task "
    "fails it is retried with a delay, and the number of retries is part of the task's arguments."
)
# one line per defect, on top of batch-001's own (2 invalid_json, 1 missing_text, 1 text_not_string, 5 exact duplicates)
EXTRA_LINES = [
    b"   ",  # blank: counted, not quarantined
    b"[1, 2, 3]",  # quarantined: not_an_object
    b'{"id": "latin1", "text": "caf\xe9 is not UTF-8 here, the bytes are Latin-1"}',  # quarantined: invalid_utf8
    json.dumps({"id": "giant", "text": "y" * 40_000}).encode(),  # quarantined: record_too_large (30000 bytes)
    json.dumps({"id": ["a", "list"], "text": "An id must be a scalar; a list id cannot name a document."}).encode(),
    # quarantined: invalid_unicode (an escaped lone surrogate; it once crashed the job in the filters)
    b'{"id": "surrogate", "text": "A lone surrogate \\ud800 escape is not a character, so this cannot be text."}',
    json.dumps({"id": "tiny", "text": "too short"}).encode(),  # excluded: length (min_chars 40)
    json.dumps({"id": "huge", "text": "x" * 25_000}).encode(),  # excluded: length (max_chars 20000)
    json.dumps(
        {
            "id": "collections",
            "text": "Another text that claims the id of the collections module docstring, "
            "written as an ordinary English sentence.",
        }
    ).encode(),
    # normalizes to logging.shutdown's text: an exact duplicate, and its smaller id is the one kept
    json.dumps(
        {"id": "aaa-variant", "text": "  " + LOGGING_SHUTDOWN.replace("cleanup ", "cleanup  \t") + "\r\n"}
    ).encode(),
    json.dumps(
        {
            "id": "zz-norm",
            "text": " Cafe\u0301   with\ttabs\u0000 and   spaces, a sentence that is plainly English "
            " \r\n  second   line, long enough to be kept \x07 ",
        }
    ).encode(),
    json.dumps({"text": "A record without an id field still gets a stable id derived from its content."}).encode(),
    json.dumps({"id": "near-a", "text": PROSE + " The web server shows the state of every run."}).encode(),
    json.dumps({"id": "near-b", "text": PROSE + " The web server shows the state of every task."}).encode(),
    json.dumps(
        {
            "id": "pii-doc",
            "text": "Write to jane.doe@example.com or reach the build host 10.1.2.3 to get "
            "the release notes for this version.",
        }
    ).encode(),
    json.dumps(
        {"id": "blocked", "text": "This document mentions frobnicate, a term the recipe's blocklist names."}
    ).encode(),
    json.dumps(
        {
            "id": "german",
            "text": "Der Planer liest jede Datei und erzeugt die Läufe, die fällig sind. "
            "Jede fehlgeschlagene Aufgabe wird mit einer Verzögerung wiederholt.",
        }
    ).encode(),
]


def _recipe(path: Path, sources: Path, **data) -> Path:
    spec = {
        "name": "test-corpus",
        "data": {
            "sources": [{"path": str(sources)}],
            "min_chars": 40,
            "max_chars": 20000,
            "min_documents": 100,
            "max_record_bytes": 30000,
            "blocklist": {"terms": ["frobnicate"]},
            "dataset_repo": "test-corpus",
            "branch": "main",
            **data,
        },
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("data-stage")
    landing = work / "landing"
    landing.mkdir()
    shutil.copy(SAMPLE, landing / "batch-001.jsonl")
    (landing / "extra.jsonl").write_bytes(b"\n".join(EXTRA_LINES) + b"\n")
    (landing / "README.txt").write_text("not a *.jsonl file: ignored")
    return SimpleNamespace(work=work, landing=landing, recipe=_recipe(work / "recipe.yaml", landing))


def _job_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }


def _submit_cmd(corpus, out: Path) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]"]
    for key, value in SPARK_CONF.items():
        cmd += ["--conf", f"{key}={value}"]
    script = str(ROOT / "spark_jobs" / "prepare_corpus.py")
    return [*cmd, script, "--input", str(corpus.landing), "--output", str(out), "--recipe", str(corpus.recipe)]


@pytest.fixture(scope="module")
def staged(corpus) -> Path:
    """The job run the plain way: spark-submit from the control-plane venv."""
    out = corpus.work / "staged-cli"
    proc = subprocess.run(_submit_cmd(corpus, out), env=_job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "prepare_corpus:" in proc.stdout
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _context(run_id: str = "manual__2026-01-01T00:00:00+00:00", try_number: int = 1) -> dict:
    from airflow.sdk.execution_time.context import OutletEventAccessors

    ti = SimpleNamespace(dag_id="test-corpus_data", task_id="t", run_id=run_id, try_number=try_number)
    return {"ti": ti, "run_id": run_id, "outlet_events": OutletEventAccessors()}


def _excluded(staged: Path) -> dict[str, dict]:
    return {r["id"]: r for r in _read_jsonl(staged / "excluded.jsonl")}


def test_every_record_is_accounted_for_per_step(staged):
    """output + quarantine + excluded = input, per step, in the stats AND in the files."""
    stats = json.loads((staged / "stats.json").read_text())
    assert stats["input_lines"] == 750 + len(EXTRA_LINES)
    assert stats["blank_lines"] == 1
    assert stats["input_lines"] == stats["blank_lines"] + stats["quarantined"] + stats["excluded"] + stats["kept"]
    steps = stats["steps"]
    assert [s["step"] for s in steps] == [
        "parse",
        "normalize",
        "length",
        "language",
        "gopher_repetition",
        "blocklist",
        "pii",
        "exact_dedup",
        "near_dedup",
        "ids",
    ]
    assert steps[0]["in"] == stats["input_lines"] - stats["blank_lines"] and steps[-1]["out"] == stats["kept"]
    for before, after in pairwise(steps):
        assert after["in"] == before["out"], f"{after['step']} does not start where {before['step']} ended"
    for s in steps:
        assert s["in"] - s["out"] == sum(s["dropped"].values()), s

    quarantine = Counter(q["reason"] for q in _read_jsonl(staged / "quarantine.jsonl"))
    assert dict(quarantine) == steps[0]["dropped"] == stats["quarantined_by_reason"]
    excluded = Counter((e["step"], e["reason"]) for e in _read_jsonl(staged / "excluded.jsonl"))
    assert excluded == Counter({(s["step"], r): n for s in steps[1:] for r, n in s["dropped"].items()})
    kept = sum(len(_read_jsonl(staged / f"{split}.jsonl")) for split in ("train", "validation", "test"))
    assert kept == stats["kept"]


def test_job_quarantines_filters_dedups_redacts_and_splits(staged):
    stats = json.loads((staged / "stats.json").read_text())
    assert stats["quarantined_by_reason"] == {
        "bad_id": 1,
        "invalid_json": 2,
        "invalid_utf8": 1,
        "missing_text": 1,
        "not_an_object": 1,
        "record_too_large": 1,
        "text_not_string": 1,
        "invalid_unicode": 1,
    }
    assert sorted(p.name for p in staged.iterdir()) == sorted(["_job.json", *VERSION_ENTRIES])
    assert json.loads((staged / "_job.json").read_text())["spark_app_id"].startswith("local-")

    quarantine = _read_jsonl(staged / "quarantine.jsonl")
    assert all(set(q) == {"line", "reason", "source"} for q in quarantine)
    assert {q["line"] for q in quarantine if q["reason"] == "invalid_json"} == {
        "not json at all",
        '{"id": "broken-1", "text": "unterminated',
    }
    assert all(q["source"].endswith(("batch-001.jsonl", "extra.jsonl")) for q in quarantine)

    excluded = _excluded(staged)
    assert all(set(e) == {"id", "step", "reason", "detail", "source", "text"} for e in excluded.values())
    expect = {
        "tiny": ("length", "text_too_short"),
        "huge": ("length", "text_too_long"),
        "german": ("language", "language_not_allowed"),
        "blocked": ("blocklist", "blocklisted"),
        "logging.shutdown": ("exact_dedup", "exact_duplicate"),
        "near-b": ("near_dedup", "near_duplicate"),
    }
    for doc_id, (step, reason) in expect.items():
        assert (excluded[doc_id]["step"], excluded[doc_id]["reason"]) == (step, reason), excluded[doc_id]
    assert excluded["logging.shutdown"]["detail"] == "duplicate of aaa-variant"
    assert excluded["near-b"]["detail"] == "near-duplicate of near-a (cluster of 2)"
    assert [e for e in excluded.values() if e["step"] == "ids"][0]["id"] == "collections"
    assert stats["near_dedup"]["clusters"] >= 1 and stats["near_dedup"]["threshold"] == 0.8

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
    assert all_docs["zz-norm"] == (
        "Caf\u00e9 with tabs and spaces, a sentence that is plainly English\nsecond line, long enough to be kept"
    )
    assert all_docs["aaa-variant"] == LOGGING_SHUTDOWN and "near-a" in all_docs
    assert "<EMAIL>" in all_docs["pii-doc"] and "<IP>" in all_docs["pii-doc"] and "jane.doe" not in all_docs["pii-doc"]
    assert any(i.startswith("doc-") for i in all_docs)
    assert stats["splits"]["train"]["docs"] > 10 * stats["splits"]["test"]["docs"]
    assert stats["kept"] >= 500, "the default filters must leave the demo corpus usable"


def test_tokenized_packed_layout_and_data_card(staged):
    """The shared contract: tokenizer/ + packed/ that the trainer reads, and a data card per version."""
    from llmops_provider.runtime.train_data import load_manifest

    stats = json.loads((staged / "stats.json").read_text())
    manifest = load_manifest(staged, 128)  # the trainer's own reader (training.seq_len defaults to 128)
    assert manifest.raw["format"] == "llmops-packed-v1" and manifest.raw["dtype"] == "uint16"
    assert manifest.raw["vocab_size"] == 2000 and manifest.tokenizer_dir == staged / "tokenizer"
    for split in ("train", "validation", "test"):
        blocks = manifest.split(split)
        info = manifest.raw["splits"][split]
        assert len(blocks) == info["blocks"] and info["tokens"] == info["blocks"] * 128
        tokens = stats["tokens"][split]
        assert tokens["document_tokens"] == info["tokens"] + tokens["dropped_tail_tokens"]
        assert tokens["dropped_tail_tokens"] < 128 and tokens["documents"] == stats["splits"][split]["docs"]
    train = manifest.split("train").take(range(len(manifest.split("train"))))
    docs, eos = stats["splits"]["train"]["docs"], int((train == manifest.raw["eos_token_id"]).sum())
    assert docs - 13 <= eos <= docs, "one EOS after each document (a few fall in the dropped tail, >= 10 tokens each)"
    assert sorted(p.name for p in (staged / "tokenizer").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # fmt: skip

    card = json.loads((staged / "data_card.json").read_text())
    assert card["records"]["kept"] == stats["kept"] and card["steps"] == [
        {k: s[k] for k in ("step", "in", "out", "dropped", "modified")} for s in stats["steps"]
    ]
    assert card["dedup_clusters"]["clusters"] >= 1 and card["length_tokens"]["train"]["count"] > 0
    from llmops_provider.data.data_card import _char_lengths, _summary

    # the job's lengths (from its outcome table) are those of the texts in the files
    assert card["length_chars"] == {s: _summary(v) for s, v in _char_lengths(staged).items()}
    png = (staged / "length_histogram.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "| near_dedup |" in (staged / "data_card.md").read_text()


def test_operator_run_is_byte_identical_and_validates(corpus, staged, monkeypatch):
    from llmops_provider.operators.data import SparkPrepareDataOperator, ValidateDatasetOperator

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    out = corpus.work / "staged-operator"
    # this run groups the LSH buckets, verifies the candidates and sorts the output in Spark (the
    # paths for large corpora and clusters), the CLI run on the driver and from part files: the
    # dataset must not depend on which
    conf = {
        **SPARK_CONF,
        "spark.llmops.lsh.localMaxRows": "0",
        "spark.llmops.verify.localMaxBytes": "0",
        "spark.llmops.write.localPartsMaxRows": "0",  # the shuffle-and-sort write, as on a cluster
    }
    op = SparkPrepareDataOperator(
        task_id="prepare", recipe_path=str(corpus.recipe), staging_dir=str(out), spark_conf=conf
    )
    result = op.execute(_context())

    json.dumps(result)  # an XCom
    assert result["staging_dir"] == str(out) and result["spark_app_id"].startswith("local-")
    # a local master gets the JVM options for short runs (llmops_provider.spark_local); the CLI run set none
    assert LOCAL_DRIVER_JAVA_OPTIONS in json.loads((out / "_job.json").read_text())["driver_java_options"]
    assert "TieredStopAtLevel" not in (json.loads((staged / "_job.json").read_text())["driver_java_options"] or "")
    assert result["stats"] == json.loads((staged / "stats.json").read_text())
    for name in DATA_FILES:
        assert (out / name).read_bytes() == (staged / name).read_bytes(), f"{name} differs between runs"
    assert tree_hash(out) == tree_hash(staged), "the same input must give the same dataset version"

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
    assert set(report["failed"]) == {
        "all_splits.expect_column_values_to_be_unique(id)",
        "validation.expect_column_value_lengths_to_be_between(text)",
    }
    markdown = (broken / "_validation_report.md").read_text()
    assert "FAILED" in markdown and "**FAIL**" in markdown

    (broken / "test.jsonl").unlink()
    with pytest.raises(AirflowFailException, match=r"test\.file_exists"):
        op.execute(_context())


def test_commit_is_idempotent_and_emits_lineage(corpus, staged, monkeypatch):
    from llmops_provider.datasets import get_store
    from llmops_provider.operators.data import CommitDatasetOperator

    recorded = []  # the Airflow Variable needs a live task supervisor; the e2e tier covers the real one
    monkeypatch.setattr(
        CommitDatasetOperator, "_record_processed_sources", lambda self, r, fp: recorded.append((r, fp))
    )

    context = _context()
    # as the DAG factory declares it: events are keyed by name AND uri, so the operator must use this one
    outlet = Asset(uri=lineage.asset_uri("test-corpus", "dataset"), name="test-corpus.dataset", group="llmops")
    first = CommitDatasetOperator(
        task_id="commit", recipe_path=str(corpus.recipe), staging_dir=str(staged), outlets=[outlet]
    ).execute(context)
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
    assert sorted(p.name for p in version.iterdir()) == VERSION_ENTRIES
    assert extra["data_card"]["steps"]["near_dedup"]["dropped"]["near_duplicate"] >= 1
    assert extra["data_card"]["tokens"]["train"] > 0

    # the operator's run (other spark app id, a validation report) holds the same data: no new version
    rerun_dir = corpus.work / "staged-operator"
    source = rerun_dir if rerun_dir.is_dir() else staged
    second_ctx = _context(run_id="scheduled__2026-01-02T00:00:00+00:00")
    second = CommitDatasetOperator(task_id="commit", recipe_path=str(corpus.recipe), staging_dir=str(source)).execute(
        second_ctx
    )
    assert second["created"] is False and second["dataset_commit"] == first["dataset_commit"]
    assert second_ctx["outlet_events"][Asset(lineage.asset_uri("test-corpus", "dataset"))].extra["created"] is False
    assert len(store.log("test-corpus", "main")) == 1


def test_a_run_that_keeps_nothing_still_accounts_for_every_line(corpus):
    """Every document filtered out: the dedup and write paths see no kept document, the job still
    publishes its counts (the validation gate is what fails such a version)."""
    recipe = _recipe(corpus.work / "keep-nothing.yaml", corpus.landing, min_chars=19_999)
    out = corpus.work / "staged-nothing"
    cmd = _submit_cmd(corpus, out)
    cmd[cmd.index("--recipe") + 1] = str(recipe)
    proc = subprocess.run(cmd, env=_job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == 0 and stats["excluded"] > 0
    assert stats["input_lines"] == stats["blank_lines"] + stats["quarantined"] + stats["excluded"]
    assert all((out / f"{split}.jsonl").read_text() == "" for split in ("train", "validation", "test"))
    assert len(_read_jsonl(out / "excluded.jsonl")) == stats["excluded"]


def test_missing_spark_connection_falls_back_to_local():
    from llmops_provider.operators.data import _find_connection, _spark_submit_hook_class

    assert _find_connection("no_such_spark_conn") is None
    hook = _spark_submit_hook_class()(
        conn_id="no_such_spark_conn", fallback_master="local[*]", application_args=["--output", "x"]
    )
    cmd = hook._build_spark_submit_command("app.py")
    assert cmd[cmd.index("--master") + 1] == "local[*]"


def test_a_job_killed_midway_leaves_the_previous_output_untouched(corpus, staged):
    """SIGKILL after the document pass: no cleanup code runs, yet readers never see a partial version."""
    out = corpus.work / "staged-killed"
    shutil.copytree(staged, out)
    before = tree_hash(out)
    proc = subprocess.Popen(
        _submit_cmd(corpus, out),
        env=_job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if "document steps done" in line:
                break
        else:
            pytest.fail("the job ended before its document pass finished")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)
    assert tree_hash(out) == before, "the killed run changed the output it had not finished"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in staged.iterdir())


def test_the_machines_cds_archive_maps_into_a_local_spark_driver():
    # `make setup` records the class-data-sharing archive local runs map (llmops_provider.spark_local);
    # with -Xshare:on the JVM refuses to start unless it can map that archive for this Spark's class path
    from llmops_provider.spark_local import archive_recorded, cds_archive_path, check_cds_archive, local_java_options

    archive = cds_archive_path()
    assert archive is not None and archive_recorded(archive), f"no sealed archive at {archive}: run `make setup`"
    assert f"-XX:SharedArchiveFile={archive}" in local_java_options()
    ok, tail = check_cds_archive(archive)
    assert ok, tail
