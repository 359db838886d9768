import logging
import os
import sys
import threading
import time

import pytest

from llmops_provider.backends.local import JobFailed, LocalProcessBackend

pytestmark = pytest.mark.unit


def test_streams_output_and_masks_secrets(caplog):
    caplog.set_level(logging.INFO)
    backend = LocalProcessBackend()
    lines = backend.run([sys.executable, "-c", "print('step 1 token=s3cr3t'); print('done')"], secrets=["s3cr3t"])
    assert lines == ["step 1 token=***", "done"]
    assert "s3cr3t" not in caplog.text
    assert "step 1 token=***" in caplog.text


def test_failure_carries_exit_code_and_tail():
    with pytest.raises(JobFailed) as err:
        LocalProcessBackend().run([sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    assert err.value.returncode == 3
    assert "boom" in str(err.value)


def test_on_kill_kills_the_whole_process_group(tmp_path):
    # the job forks a grandchild (like the deepspeed launcher forks ranks); both must die
    pidfile = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time;"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid));"
        "print('started', flush=True); time.sleep(600)"
    )
    backend = LocalProcessBackend()
    errors = []
    runner = threading.Thread(target=lambda: _run_catch(backend, script, errors))
    runner.start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "job did not start"
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    backend.on_kill()
    runner.join(30)
    assert not runner.is_alive()
    assert errors and isinstance(errors[0], JobFailed)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def _run_catch(backend, script, errors):
    try:
        backend.run([sys.executable, "-c", script])
    except JobFailed as exc:
        errors.append(exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
