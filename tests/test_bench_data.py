"""fastibd.bench_data: a tiny real run of both loaders on both shapes, and its errors."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from fastibd.bench import data as bench_data
from fastibd.errors import UserError
from tests.conftest import cli_error

# Batch sizes that do not divide the counts: the last, partial batch must be counted too.
COUNTS = {"cifar": 64, "imagenet": 16}
BATCHES = {"cifar": 24, "imagenet": 6}
EPOCHS = 2
RESOLUTION = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    """One benchmark run (stdout, JSON report, work dir), shared by the tests below."""
    root = tmp_path_factory.mktemp("bench")
    report, work = root / "report.json", root / "work"
    argv = ["--n-images", "cifar=64,imagenet=16", "--batch-size", "cifar=24,imagenet=6",
            "--workers", "1", "--epochs", str(EPOCHS), "--resolution", str(RESOLUTION),
            "--work-dir", str(work), "--json", str(report), "--no-progress"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert bench_data.main(argv) == 0
    return out.getvalue(), json.loads(report.read_text()), work


def table_rates(table: str) -> dict[tuple[str, str], float]:
    """images/s per (dataset, loader) read back from the printed table."""
    lines = table.splitlines()
    header = lines[0].split("  ")
    header = [cell.strip() for cell in header if cell.strip()]
    column = header.index("images/s")
    rates = {}
    for line in lines[2:]:
        cells = line.split()
        if cells and cells[0] in bench_data.SHAPES:
            rates[cells[0], cells[1]] = float(cells[column].replace(",", ""))
    return rates


def test_table_has_both_loaders_on_both_shapes(run) -> None:
    out, _, _ = run
    rates = table_rates(out)
    assert set(rates) == {(s, loader) for s in COUNTS for loader in ("torchvision", "ffcv")}
    assert all(rate > 0 for rate in rates.values()), out


def test_report_counts_every_image_of_every_timed_epoch(run) -> None:
    _, report, _ = run
    assert report["schema_version"] == bench_data.SCHEMA_VERSION
    assert report["config"]["epochs"] == EPOCHS and report["config"]["workers"] == 1
    results = report["results"]
    assert [(r["dataset"], r["loader"]) for r in results] == [
        ("cifar", "torchvision"), ("cifar", "ffcv"), ("imagenet", "torchvision"),
        ("imagenet", "ffcv")]
    for r in results:
        shape = r["dataset"]
        assert r["images"] == COUNTS[shape] and r["batch_size"] == BATCHES[shape]
        assert r["images_seen"] == COUNTS[shape] * EPOCHS, r
        assert r["seconds"] > 0 and r["first_batch_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["images_seen"] / r["seconds"])
    speedup = report["ffcv_over_torchvision"]
    rate = {(r["dataset"], r["loader"]): r["images_per_s"] for r in results}
    for shape in COUNTS:
        assert speedup[shape] == pytest.approx(rate[shape, "ffcv"] / rate[shape, "torchvision"])


def test_both_loaders_deliver_the_same_kind_of_batch(run) -> None:
    _, report, _ = run
    side = {"cifar": 32, "imagenet": RESOLUTION}
    for r in report["results"]:
        shape = r["dataset"]
        assert r["batch_shape"] == [BATCHES[shape], 3, side[shape], side[shape]], r
        assert (r["dtype"], r["device"]) == ("float32", "cpu")
        low, high = r["value_range"]
        assert 0.0 <= low < high <= 1.0


def test_a_given_work_dir_is_kept_with_the_data(run) -> None:
    _, _, work = run
    assert len(list((work / "cifar" / "images").rglob("*.png"))) == COUNTS["cifar"]
    assert len(list((work / "imagenet" / "images").rglob("*.jpg"))) == COUNTS["imagenet"]
    assert (work / "cifar" / "train.beton").is_file()
    assert (work / "imagenet" / "train.beton").is_file()


@pytest.mark.parametrize(("argv", "expected"), [
    (["--n-images", "-5"], "out of range"),
    (["--n-images", "cifar=0"], "out of range"),
    (["--n-images", "mnist=3"], "expected NAME=N"),
    (["--batch-size", "many"], "not a valid int"),
    (["--datasets", "cifar,mnist"], "comma-separated list"),
    (["--epochs", "0"], "out of range"),
    (["--workers", "0"], "out of range"),
    (["--json", "/nonexistent-folder/r.json"], "does not exist"),
])
def test_bad_input_is_one_line(argv: list[str], expected: str, capsys) -> None:
    line = cli_error(bench_data.main, argv, capsys)
    assert "error: " in line and expected in line, line


def test_an_occupied_work_dir_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    (tmp_path / "cifar").mkdir()
    line = cli_error(bench_data.main, ["--datasets", "cifar", "--work-dir", str(tmp_path)], capsys)
    assert "already exists" in line
    assert list(tmp_path.iterdir()) == [tmp_path / "cifar"]


def test_the_temporary_work_dir_is_removed_after_a_failure(tmp_path: Path, capsys,
                                                           monkeypatch) -> None:
    work = tmp_path / "temporary"

    def fail(work_dir: Path, shape: str, count: int, args) -> Path:
        (work_dir / shape).mkdir()
        raise UserError("no space left")

    monkeypatch.setattr(bench_data.tempfile, "mkdtemp", lambda prefix: str(work.mkdir() or work))
    monkeypatch.setattr(bench_data, "prepare", fail)
    line = cli_error(bench_data.main, ["--datasets", "cifar"], capsys)
    assert line == "fastibd.bench_data: error: no space left"
    assert not work.exists()
