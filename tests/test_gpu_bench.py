"""``bench/gpu.sh``: it refuses at once without CUDA, and its CPU dry run runs every step end to end.

The dry run is the same script the GPU run uses, at tiny sizes on the CPU: both throughput benchmarks (each
variant in its own process), a DDP pretraining through ``taxomoco pretrain`` on two CPU processes (gloo), and a
training enqueued on the product's RQ queue (real redis-server, real Label Studio) run by ``taxomoco worker``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu.sh"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def test_without_cuda_it_stops_at_once_with_exit_code_2(tmp_path: Path) -> None:
    out = tmp_path / "gpu.txt"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], env=_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU visible" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()


@pytest.mark.e2e
@pytest.mark.redis
@pytest.mark.timeout(900)
def test_cpu_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu-dryrun.txt"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], env=_env(),
                          capture_output=True, text=True, timeout=880)
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{text[-4000:]}"
    assert "FAILED" not in text
    assert "DRY RUN" in text and "Command: `bench/gpu.sh --dry-run`" in text and "load average" in text
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    for number in ("1.", "2.", "3.", "4."):
        assert any(s.startswith(f"## {number}") for s in sections), sections
    assert "ours / tuned bare loop, per round" in text  # 1: ours and the tuned baseline in the same run
    assert "Embedder / tuned bare loop, per round" in text  # 2
    ddp_rows = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert ddp_rows and "pretrained encoder" in ddp_rows[0]  # 3: two DDP processes, rank 0's summary
    assert "Initializing distributed" in text
    assert "Published version: 2" in text and "job step `pretrain`" in text  # 4: the queued training ran
