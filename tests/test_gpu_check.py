"""scripts/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DEVICE=cpu): the parts run, the
summary records each one, a part that fails or runs out of time is reported without stopping
the others, and bad settings stop it with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable,
                               "GPU_CHECK_DEVICE": "cpu", **env})


def status_rows(out: Path) -> dict[str, str]:
    rows = [line.split("|") for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| part")]
    return {cells[1].strip(): cells[2].strip() for cells in rows}


def test_rehearsal_runs_the_parts_and_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = gpu_check(out, GPU_CHECK_PARTS="kernels,step")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert status_rows(out) == {"kernels": "passed", "step": "passed"}
    summary = (out / "summary.md").read_text()
    assert "torch " in summary and "## fastibd.bench_step" in summary
    assert "skipped" in (out / "kernels.log").read_text()  # CUDA tests collected, skipped
    saved = json.loads((out / "bench_step.json").read_text())
    assert [r["variant"] for r in saved["results"]] == ["baseline", "fastibd"]


def test_a_part_out_of_time_is_reported_and_the_rest_still_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = gpu_check(out, GPU_CHECK_PARTS="step,kernels", GPU_CHECK_TIMEOUT_STEP="1")
    assert result.returncode == 1
    assert status_rows(out) == {"step": "timed out", "kernels": "passed"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bad_settings_stop_with_one_line(tmp_path: Path) -> None:
    for env, expected in ((dict(GPU_CHECK_PARTS="kernels,speed"), "unknown part 'speed'"),
                          (dict(GPU_CHECK_DEVICE="tpu"), "must be cuda or cpu"),
                          (dict(PYTHON="no-such-python"), "no no-such-python on PATH"),
                          (dict(GPU_CHECK_DEVICE="cuda"), "torch sees no CUDA device")):
        result = gpu_check(tmp_path / "results", **env)
        assert result.returncode == 2, env
        assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, env
    assert not (tmp_path / "results").exists()
