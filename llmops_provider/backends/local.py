"""Local compute backend: the job entrypoint as a subprocess of the Airflow task.

Output is streamed line by line into the task log; the child runs in its own process group
so ``on_kill`` (task cleared, marked failed, timed out) kills the whole tree - launcher and
every rank - not just the parent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    def __init__(self, cmd: Sequence[str], returncode: int, tail: list[str]):
        self.returncode = returncode
        self.tail = tail
        joined = "\n".join(tail[-30:])
        super().__init__(f"job {cmd[0]} exited with code {returncode}; last lines:\n{joined}")


class LocalProcessBackend:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or log
        self._proc: subprocess.Popen | None = None

    def run(
        self,
        cmd: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        secrets: Sequence[str] = (),
        pid_file: Path | None = None,
    ) -> list[str]:
        """Run ``cmd`` to completion, streaming its output; returns the output lines.

        ``secrets`` are masked from every streamed line (defence in depth on top of
        Airflow's own masking). ``pid_file`` records the job's process group while it runs, so
        the next try can stop what a killed worker left behind (:func:`kill_leftover`).
        """
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.log.info("starting local job: %s", _mask(" ".join(cmd), secrets))
        started = time.monotonic()
        self._proc = subprocess.Popen(
            list(cmd),
            env=full_env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        if pid_file is not None:
            pid_file.write_text(f"{self._proc.pid}\n")
        lines: list[str] = []
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = _mask(line.rstrip("\n"), secrets)
            lines.append(line)
            if len(lines) > 2000:
                del lines[:1000]
            self.log.info("%s", line)
        rc = self._proc.wait()
        self.log.info("local job finished with code %s in %.1fs", rc, time.monotonic() - started)
        self._proc = None
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        if rc != 0:
            raise JobFailed(cmd, rc, lines)
        return lines

    def on_kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        kill_process_group(proc.pid, self.log)


def _mask(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def kill_process_group(pid: int, logger: logging.Logger | None = None, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``grace_s``."""
    logger = logger or log
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    logger.info("terminating process group %s", pgid)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    logger.warning("process group %s still alive after %.0fs: SIGKILL", pgid, grace_s)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in process group ``pgid`` (Linux /proc)."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                members.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return members


def kill_leftover(pid_file: Path, marker: str, logger: logging.Logger | None = None) -> bool:
    """SIGKILL the process group an earlier try recorded in ``pid_file`` if it still runs ``marker``.

    A worker that dies without ``on_kill`` (OOM-killed, node lost) leaves its job's own process
    group running; the retry must not train beside it on the same checkpoints. ``marker`` (the
    job's spec path) guards against a recycled pid. True when something was killed.
    """
    logger = logger or log
    try:
        pgid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    ours = [pid for pid, cmdline in _group_members(pgid) if marker in cmdline]
    if ours:
        logger.warning("an earlier try's job is still running (process group %s, pids %s): SIGKILL", pgid, ours)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    pid_file.unlink(missing_ok=True)
    return bool(ours)


SHM_DIR = Path("/dev/shm")


def release_shm_buffers(master_port: int, logger: logging.Logger | None = None, shm_dir: Path = SHM_DIR) -> int:
    """Remove the shared-memory all-reduce buffers of the DeepSpeed CPU job on ``master_port``.

    DeepSpeed's CPU communication backend creates ``deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>``
    (about 70 MB per rank for a tiny model) in /dev/shm and never unlinks them; a killed job
    cannot. Left alone, every local training run leaks them until the machine runs out of memory.
    Called when the job's process group is gone; returns the number of files removed.
    """
    removed = 0
    for path in shm_dir.glob(f"deepspeed_allreduce_buffer_*_{int(master_port)}_*"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        (logger or log).info("released %d DeepSpeed shared-memory buffer(s) of port %s", removed, master_port)
    return removed


class LocalJobMixin:
    """For operators that run a job-runtime entrypoint as a local process.

    ``run_local_job`` streams it into the task log and turns a failure into an AirflowException
    that starts with ``failure`` (what did NOT happen, e.g. "the model is NOT approved");
    ``on_kill`` kills the job's whole process group.
    """

    _job_backend: LocalProcessBackend | None = None

    def run_local_job(
        self,
        cmd: Sequence[str],
        env: dict[str, str],
        failure: str,
        secrets: Sequence[str] = (),
        pid_file: Path | None = None,
    ) -> list[str]:
        from llmops_provider.compat import AirflowException

        self._job_backend = LocalProcessBackend(self.log)  # type: ignore[attr-defined]
        try:
            return self._job_backend.run(cmd, env=env, secrets=secrets, pid_file=pid_file)
        except JobFailed as exc:
            raise AirflowException(f"{failure} {exc}") from None
        finally:
            self._job_backend = None

    def on_kill(self) -> None:
        if self._job_backend is not None:
            self._job_backend.on_kill()
