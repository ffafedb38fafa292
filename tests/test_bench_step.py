"""fastibd.bench_step on the CPU: both variants of the real training step, tiny shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastibd.bench import step as bench_step
from tests.conftest import cli_error


def test_step_benchmark_prints_both_variants_and_saves_json(capsys: pytest.CaptureFixture,
                                                            tmp_path: Path) -> None:
    report = tmp_path / "step.json"
    assert bench_step.main(["--device", "cpu", "--data", "device", "--warmup", "1", "--steps",
                            "1", "--no-progress", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    for name in bench_step.CPU_WORKLOADS:
        rows = [line.split() for line in out.splitlines() if line.startswith(name)]
        assert [row[1] for row in rows] == ["baseline", "fastibd"]
        assert [row[2] for row in rows] == ["device", "device"]
        assert all(float(row[7].replace(",", "")) > 0 for row in rows)
    results = json.loads(report.read_text())["results"]
    assert len(results) == 2 * len(bench_step.CPU_WORKLOADS)
    for r in results:
        assert r["steps"] == 1 and r["seconds"] > 0
        # On a CPU this project's step resolves to fp32, eager, NCHW (see fastibd.device).
        assert (r["precision"], r["compiled"], r["channels_last"]) == ("float32", False, False)


def test_loaders_mode_times_torchvision_against_ffcv(capsys: pytest.CaptureFixture,
                                                     tmp_path: Path) -> None:
    report = tmp_path / "step.json"
    assert bench_step.main(["--device", "cpu", "--data", "loaders", "--workloads", "cifar-tiny",
                            "--warmup", "1", "--steps", "2", "--no-progress",
                            "--json", str(report)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("cifar-tiny")]
    assert [row[1:3] for row in rows] == [["baseline", "torchvision"], ["fastibd", "ffcv"]]
    saved = json.loads(report.read_text())
    assert saved["data"] == "loaders"
    assert [r["steps"] for r in saved["results"]] == [2, 2]


@pytest.mark.parametrize("name", list(bench_step.CPU_WORKLOADS))
def test_both_loaders_give_the_step_what_it_trains_on(name: str, tmp_path: Path) -> None:
    """Each variant's loader yields augmented float [0, 1] batches of the workload's shape,
    in the variant's layout, with labels of its classes; one epoch holds exactly the
    batches the benchmark draws."""
    work = bench_step.CPU_WORKLOADS[name]
    settings = bench_step.loader_setup(work, torch.device("cpu"), workers=1, progress=False)
    root = bench_step.write_data(tmp_path, work, 2 * work.batch_size, settings)
    for make, fmt in ((bench_step.torchvision_batches, torch.contiguous_format),
                      (bench_step.ffcv_batches, torch.channels_last)):
        batches = list(make(root, work, settings, fmt))
        assert len(batches) == 2, make.__name__
        for x, y in batches:
            assert x.shape == (work.batch_size, 3, work.resolution, work.resolution)
            assert x.dtype == torch.float32 and x.is_contiguous(memory_format=fmt)
            assert 0 <= x.min() < x.max() <= 1
            assert y.shape == (work.batch_size,) and 0 <= y.min() and y.max() < 10


def test_benchmarked_step_trains_the_student() -> None:
    work = bench_step.CPU_WORKLOADS["cifar-tiny"]
    step, _ = bench_step.workload_step(work, "fastibd", torch.device("cpu"))
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
    (["--device", "cpu", "--data", "loaders", "--warmup", "0"], "--warmup >= 1"),
])
def test_bad_input_is_one_line(argv: list[str], expected: str,
                               capsys: pytest.CaptureFixture) -> None:
    line = cli_error(bench_step.main, argv, capsys)
    assert expected in line, line


def test_loaders_mode_without_ffcv_is_one_line(capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = bench_step.importlib.util.find_spec
    monkeypatch.setattr(bench_step.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ffcv" else find_spec(name, *a))
    line = cli_error(bench_step.main, ["--device", "cpu", "--data", "loaders"], capsys)
    assert "needs ffcv" in line and "--data device" in line, line


def test_a_json_that_cannot_be_written_is_refused_before_measuring(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*args, **kwargs):
        raise AssertionError("measured before checking --json")

    monkeypatch.setattr(bench_step, "measure", reached)
    (tmp_path / "file").write_text("")
    cases = {
        tmp_path / "file" / "r.json": f"--json folder {tmp_path / 'file'} is a file, not a "
                                      "directory",
        tmp_path / "missing" / "r.json": f"--json {tmp_path / 'missing' / 'r.json'}: folder "
                                         f"{tmp_path / 'missing'} does not exist",
        tmp_path: f"--json {tmp_path} is a directory, not a file; give a file name such as "
                  f"{tmp_path / 'step.json'}",
    }
    for path, expected in cases.items():
        line = cli_error(bench_step.main, ["--device", "cpu", "--data", "device", "--json",
                                           str(path)], capsys)
        assert line == f"fastibd.bench_step: error: {expected}", line
    assert not (tmp_path / "missing").exists()


def test_every_option_has_help_and_errors_name_the_command(capsys: pytest.CaptureFixture
                                                           ) -> None:
    for action in bench_step.build_parser()._actions:
        assert action.help, action.option_strings
    line = cli_error(bench_step.main, ["--steps", "0"], capsys)
    assert line.startswith("fastibd.bench_step: error: argument --steps"), line
