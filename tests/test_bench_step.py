"""fastibd.bench_step on the CPU: both variants of the real training step, tiny shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastibd import bench_step
from tests.conftest import cli_error


def test_step_benchmark_prints_both_variants_and_saves_json(capsys: pytest.CaptureFixture,
                                                            tmp_path: Path) -> None:
    report = tmp_path / "step.json"
    assert bench_step.main(["--device", "cpu", "--warmup", "1", "--steps", "1", "--no-progress",
                            "--json", str(report)]) == 0
    out = capsys.readouterr().out
    for name in bench_step.CPU_WORKLOADS:
        rows = [line.split() for line in out.splitlines() if line.startswith(name)]
        assert [row[1] for row in rows] == ["baseline", "fastibd"]
        assert all(float(row[6].replace(",", "")) > 0 for row in rows)
    results = json.loads(report.read_text())["results"]
    assert len(results) == 2 * len(bench_step.CPU_WORKLOADS)
    for r in results:
        assert r["steps"] == 1 and r["seconds"] > 0
        # On a CPU this project's step resolves to fp32, eager, NCHW (see fastibd.train).
        assert (r["precision"], r["compiled"], r["channels_last"]) == ("float32", False, False)


def test_benchmarked_step_trains_the_student() -> None:
    work = bench_step.CPU_WORKLOADS["cifar-tiny"]
    step, _ = bench_step.build_step(work, "fastibd", torch.device("cpu"))
    before = [p.detach().clone() for p in step.student.parameters()]
    x = torch.rand(work.batch_size, 3, work.resolution, work.resolution)
    y = torch.randint(0, work.num_classes, (work.batch_size,))
    loss, parts = step(x, y)
    assert torch.isfinite(loss) and {"feat", "kl_nat", "kl_adv"} <= set(parts)
    assert any(not torch.equal(a, b) for a, b in zip(before, step.student.parameters(),
                                                     strict=True))


@pytest.mark.parametrize(("argv", "expected"), [
    (["--device", "cpu", "--workloads", "cifar"], "unknown workload 'cifar' on cpu"),
    (["--device", "cpu", "--variants", "fast"], "unknown variant 'fast'"),
    (["--steps", "0"], "--steps"),
])
def test_bad_input_is_one_line(argv: list[str], expected: str,
                               capsys: pytest.CaptureFixture) -> None:
    line = cli_error(bench_step.main, argv, capsys)
    assert expected in line, line
