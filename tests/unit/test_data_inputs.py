"""The data run reads an explicit file list and records the fingerprint of exactly that list."""

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


def test_local_masters_get_the_short_run_jvm_options_unless_set():
    from llmops_provider.spark_local import JAVA_OPTIONS_KEY, LOCAL_DRIVER_JAVA_OPTIONS, local_defaults

    conf = {"spark.ui.showConsoleProgress": "false"}
    assert local_defaults("local[2]", conf) == {**conf, JAVA_OPTIONS_KEY: LOCAL_DRIVER_JAVA_OPTIONS}
    assert "TieredStopAtLevel=1" in LOCAL_DRIVER_JAVA_OPTIONS
    for master in ("spark://head:7077", "k8s://https://api:6443", "yarn"):
        assert local_defaults(master, conf) == conf  # long-lived executors keep the JVM's defaults
    mine = {JAVA_OPTIONS_KEY: "-Xss4m"}
    assert local_defaults("local[*]", mine) == mine  # the user's own options win
