"""What bench_train_cpu.py and bench_train_gpu.py share: running a side and reading its figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_checked(cmd: list[str], env: dict[str, str], what: str) -> None:
    """Run one side of a benchmark in the repo root; on failure exit with the tail of its output."""
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def run_runtime(spec_path: Path, ranks: int, env: dict[str, str], launcher: Path) -> float:
    """This project's training runtime under the deepspeed launcher: its steady tokens/s (result.json)."""
    from llmops_provider.runtime.train import free_port, launch_command

    run_checked(
        launch_command(str(spec_path), ranks, launcher=str(launcher), master_port=free_port()),
        env,
        "the training runtime",
    )
    out = Path(json.loads(spec_path.read_text())["output_dir"])
    return json.loads((out / "result.json").read_text())["tokens_per_s"]
