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


def test_retry_kills_the_job_a_lost_worker_left_running(tmp_path):
    """A worker killed without on_kill leaves its job's group running; the next try stops it first."""
    import subprocess

    from llmops_provider.backends.local import kill_leftover

    spec = tmp_path / "train-spec.json"
    spec.write_text("{}")
    pid_file = tmp_path / "train.pid"
    rank = f"import time; time.sleep(600)  # --spec {spec}"
    launcher = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {rank!r}]); time.sleep(600)"
    leader = subprocess.Popen([sys.executable, "-c", launcher, "--spec", str(spec)], start_new_session=True)
    try:
        pid_file.write_text(f"{leader.pid}\n")
        assert not kill_leftover(pid_file, str(tmp_path / "other-spec.json")), "another job's group is left alone"
        assert _alive(leader.pid)
        pid_file.write_text(f"{leader.pid}\n")
        assert kill_leftover(pid_file, str(spec))
        leader.wait(10)
        assert not pid_file.exists()
        assert not kill_leftover(pid_file, str(spec)), "nothing recorded: nothing to do"
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, 9)
            leader.wait(10)


def test_pid_file_records_the_group_while_the_job_runs(tmp_path):
    pid_file = tmp_path / "job.pid"
    lines = LocalProcessBackend().run(
        [sys.executable, "-c", f"print(open({str(pid_file)!r}).read().strip())"], pid_file=pid_file
    )
    assert lines[0].isdigit() and not pid_file.exists()


def test_release_shm_buffers_removes_only_that_jobs_buffers(tmp_path):
    from llmops_provider.backends.local import release_shm_buffers

    ours = [tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_41234_{rank}" for rank in (0, 1)]
    other = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_41235_0"
    unrelated = tmp_path / "psm_1234"
    for path in (*ours, other, unrelated):
        path.write_bytes(b"x")
    assert release_shm_buffers(41234, shm_dir=tmp_path) == 2
    assert not any(p.exists() for p in ours)
    assert other.exists() and unrelated.exists()
    assert release_shm_buffers(41234, shm_dir=tmp_path) == 0
