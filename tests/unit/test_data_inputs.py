"""The data run reads an explicit file list and records the fingerprint of exactly that list."""

import json

import pytest

from llmops_provider.compat import AirflowFailException
from llmops_provider.monitoring import source_fingerprint
from llmops_provider.operators.data import SparkPrepareDataOperator

pytestmark = pytest.mark.unit


def _op():
    return SparkPrepareDataOperator(task_id="prepare", recipe_path="unused.yaml")


def test_files_and_fingerprint_match_the_monitors_view(tmp_path):
    landing = tmp_path / "landing"
    (landing / "sub").mkdir(parents=True)
    (landing / "a.jsonl").write_text('{"text": "a"}\n')
    (landing / "sub" / "b.jsonl").write_text('{"text": "b"}\n')
    (landing / ".c.jsonl.partial").write_text("half a copy")  # a copy in progress is not read
    (landing / "notes.txt").write_text("not data")
    files, fingerprint = _op()._resolve_inputs([str(landing)])
    assert files == [str(landing / "a.jsonl"), str(landing / "sub" / "b.jsonl")]
    assert fingerprint == source_fingerprint([landing])  # the monitor sees the same data as processed


def test_an_empty_landing_dir_fails_with_the_field_and_the_fix(tmp_path):
    with pytest.raises(AirflowFailException, match=r"no \*\.jsonl files .*data\.sources"):
        _op()._resolve_inputs([str(tmp_path)])


def test_remote_sources_pass_through_unfingerprinted(tmp_path):
    files, fingerprint = _op()._resolve_inputs(["s3a://corpus/main/raw/"])
    assert files == ["s3a://corpus/main/raw/"] and fingerprint is None


def test_local_masters_get_the_short_run_jvm_options_unless_set(tmp_path, monkeypatch):
    from llmops_provider.spark_local import (
        JAVA_OPTIONS_KEY,
        LOCAL_DRIVER_JAVA_OPTIONS,
        cds_archive_path,
        local_defaults,
    )

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    conf = {"spark.ui.showConsoleProgress": "false"}
    assert local_defaults("local[2]", conf) == {**conf, JAVA_OPTIONS_KEY: LOCAL_DRIVER_JAVA_OPTIONS}  # no archive yet
    archive = cds_archive_path()
    assert archive.parent == tmp_path / "llmops" and archive.suffix == ".jsa"
    archive.parent.mkdir()
    archive.write_bytes(b"recorded")
    assert local_defaults("local[2]", conf)[JAVA_OPTIONS_KEY] == LOCAL_DRIVER_JAVA_OPTIONS  # not checked and sealed
    st = archive.stat()
    archive.with_suffix(".json").write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    assert local_defaults("local[2]", conf) == {  # a sealed archive: local runs map it
        **conf,
        JAVA_OPTIONS_KEY: f"{LOCAL_DRIVER_JAVA_OPTIONS} -XX:SharedArchiveFile={archive}",
    }
    archive.write_bytes(b"rec")  # truncated after sealing (a JDK 17 JVM dies of SIGBUS on one): not used
    assert local_defaults("local[2]", conf)[JAVA_OPTIONS_KEY] == LOCAL_DRIVER_JAVA_OPTIONS
    assert "TieredStopAtLevel=1" in LOCAL_DRIVER_JAVA_OPTIONS
    for master in ("spark://head:7077", "k8s://https://api:6443", "yarn"):
        assert local_defaults(master, conf) == conf  # long-lived executors keep the JVM's defaults
    mine = {JAVA_OPTIONS_KEY: "-Xss4m"}
    assert local_defaults("local[*]", mine) == mine  # the user's own options win


def test_the_cds_archive_is_named_for_the_spark_and_java_installations(tmp_path, monkeypatch):
    from llmops_provider.spark_local import cds_archive_path, spark_home

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    mine = cds_archive_path()
    fake = tmp_path / "spark"
    (fake / "jars").mkdir(parents=True)
    (fake / "jars" / "spark-core.jar").write_bytes(b"x")
    monkeypatch.setenv("SPARK_HOME", str(fake))
    assert spark_home() == fake
    other = cds_archive_path()
    assert other != mine and other.parent == mine.parent  # another Spark: another archive
    (fake / "jars" / "spark-sql.jar").write_bytes(b"y")
    assert cds_archive_path() != other  # an upgraded class path: another archive
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert cds_archive_path() is None  # no java: no archive (the runs still work)
