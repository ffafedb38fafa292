"""data_prep/write_ffcv.py: round trips, options and the errors users hit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import write_ffcv
from fastibd.data import LoaderOptions, make_loader
from fastibd.data.sources import DIGITS_VAL_EVERY, digits_dataset
from tests.conftest import make_image_folder

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "data_prep" / "write_ffcv.py"


def read_all(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of a constant-size .beton in stored order, as uint8 HWC images and labels."""
    loader = make_loader(path, "cifar", "eval",
                         LoaderOptions(batch_size=64, order="sequential", num_workers=2))
    images, labels = [], []
    for x, y in loader:
        images.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().copy())
        labels.append(y.numpy().copy())
    return np.concatenate(images), np.concatenate(labels)


def folder_files(root: Path, split: str) -> list[tuple[Path, int]]:
    """ImageFolder's sample order: classes sorted, files sorted within each class."""
    classes = sorted(p.name for p in (root / split).iterdir())
    return [(file, label) for label, name in enumerate(classes)
            for file in sorted((root / split / name).iterdir())]


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, val = digits_dataset("train"), digits_dataset("val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert len(set(train.labels.tolist())) == 10 and len(set(val.labels.tolist())) == 10
    from sklearn.datasets import load_digits

    assert np.array_equal(val.labels, load_digits().target[::DIGITS_VAL_EVERY])


def test_digits_round_trip_is_exact(digits_dir: Path) -> None:
    for split in ("train", "val"):
        source = digits_dataset(split)
        images, labels = read_all(digits_dir / f"{split}.beton")
        assert np.array_equal(labels, source.labels)
        assert np.array_equal(images, source.images)
    assert not list(digits_dir.glob("*.partial"))


def test_folder_raw_round_trip_is_exact(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "src", sizes=[(20, 14)])
    out = tmp_path / "out"
    assert write_ffcv.main(["--dataset", "folder", "--data-dir", str(root), "--out-dir", str(out),
                            "--write-mode", "raw", "--num-workers", "2"]) == 0
    for split in ("train", "val"):
        files = folder_files(root, split)
        images, labels = read_all(out / f"{split}.beton")
        assert labels.tolist() == [c for _, c in files]
        expected = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
        assert np.array_equal(images, expected)  # raw stores exactly what PIL decodes


def test_folder_jpg_round_trip_within_jpeg_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "src", sizes=[(24, 16)])
    out = tmp_path / "out"
    assert write_ffcv.main(["--dataset", "imagenet", "--data-dir", str(root), "--out-dir", str(out),
                            "--write-mode", "jpg", "--jpeg-quality", "90", "--limit", "7",
                            "--num-workers", "2"]) == 0
    every = folder_files(root, "val")
    files = [every[i] for i in write_ffcv.limited(len(every), 7)]
    images, labels = read_all(out / "val.beton")
    assert labels.tolist() == [c for _, c in files]
    # --limit spreads over the stored order: every class of the folder, not the first ones
    assert len(files) == 7 and set(labels.tolist()) == {0, 1, 2}
    assert write_ffcv.limited(12, 7) == [0, 2, 4, 6, 7, 9, 11]
    assert write_ffcv.limited(5, 9) == write_ffcv.limited(5, None) == [0, 1, 2, 3, 4]
    expected = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    # The stored bytes are a quality-90 JPEG: what comes back is far closer to our own q90
    # round trip of the source than to the source (the rest is JPEG decoders' rounding).
    jpeg_error = np.abs(images.astype(int) - expected)
    decoder_gap = np.abs(images.astype(int) - jpeg_round_trip(expected, quality=90))
    assert 1.0 < jpeg_error.mean() < 8.0
    assert decoder_gap.mean() < 0.4 * jpeg_error.mean() and decoder_gap.max() <= 8
    assert (out / "val.beton").stat().st_size > 0


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    import cv2

    out = []
    for image in images:
        ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        out.append(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])
    return np.stack(out).astype(int)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr  # progress bars may precede
    assert errors[0].startswith("write_ffcv.py: error:")
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--dataset", "mnist"], ["invalid choice", "mnist"]),
        (["--dataset", "digits", "--jpeg-quality", "101"], ["--jpeg-quality", "between 1 and 100"]),
        (["--dataset", "digits", "--limit", "0"], ["--limit", "at least 1"]),
        (["--dataset", "digits", "--compress-probability", "half"], ["not a valid float"]),
        (["--dataset", "folder"], ["needs --data-dir"]),
        (["--dataset", "folder", "--data-dir", "/nonexistent/imagenet"], ["does not exist"]),
    ],
)
def test_bad_command_lines(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_one_line_error(run_cli(*args, "--out-dir", str(tmp_path / "out")), *needles)
    assert not (tmp_path / "out").exists()


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "val").mkdir()
    result = run_cli("--dataset", "folder", "--data-dir", str(tmp_path / "src"),
                     "--out-dir", str(tmp_path / "out"))
    assert_one_line_error(result, "class folder")


def test_unreadable_image_names_the_file_and_leaves_no_beton(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "src", sizes=[(20, 14)])
    broken = root / "val" / "dog" / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    out = tmp_path / "out"
    result = run_cli("--dataset", "folder", "--data-dir", str(root), "--out-dir", str(out),
                     "--num-workers", "2")
    assert_one_line_error(result, "cannot read image", str(broken))
    assert (out / "train.beton").exists()  # the good split was written completely
    assert not (out / "val.beton").exists()
    assert not list(out.glob("*.partial"))


def test_cifar_without_network_says_what_to_do(tmp_path: Path) -> None:
    # Point the download at a closed local port, so this fails the same way everywhere.
    closed = "http://127.0.0.1:9"
    result = run_cli("--dataset", "cifar10", "--data-dir", str(tmp_path / "dl"),
                     "--out-dir", str(tmp_path / "out"),
                     env={"http_proxy": closed, "https_proxy": closed,
                          "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "no_proxy": ""})
    assert_one_line_error(result, "could not get cifar10", "--data-dir", "--dataset digits")
    assert not (tmp_path / "out" / "train.beton").exists()


def test_refuses_to_clobber_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "val.beton").write_bytes(b"precious")
    result = run_cli("--dataset", "digits", "--out-dir", str(out))
    assert_one_line_error(result, "already exists", "--overwrite")
    assert (out / "val.beton").read_bytes() == b"precious"
    assert not (out / "train.beton").exists()  # refused before writing anything


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "val.beton").write_bytes(b"stale")
    assert write_ffcv.main(["--dataset", "digits", "--out-dir", str(out), "--overwrite",
                            "--limit", "50", "--num-workers", "2"]) == 0
    assert (out / "val.beton").stat().st_size > 1000


def test_write_beton_progress_bar_can_be_silenced(tmp_path: Path,
                                                  capfd: pytest.CaptureFixture) -> None:
    from fastibd.data.beton import write_beton
    from fastibd.data.sources import ArrayDataset

    data = ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    write_beton(data, tmp_path / "loud.beton", num_workers=1)
    assert "4/4" in capfd.readouterr().err  # FFCV's own tqdm bar
    write_beton(data, tmp_path / "quiet.beton", num_workers=1, progress=False)
    assert capfd.readouterr().err == ""
    assert (tmp_path / "quiet.beton").read_bytes() == (tmp_path / "loud.beton").read_bytes()


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_an_image_ffcv_cannot_store_is_one_error_not_a_hang(tmp_path: Path,
                                                            start_method: str) -> None:
    """A raw image over FFCV's 8 MiB page makes its encoder raise in the worker; the worker
    died and DatasetWriter waited for its samples forever. Under forkserver (Python 3.14's
    default) too: the guard reaches the workers only if they are forked."""
    import multiprocessing
    import signal

    from fastibd.data.beton import image_field, write_beton
    from fastibd.data.sources import ArrayDataset
    from fastibd.errors import UserError

    def hung(*_: object) -> None:
        raise TimeoutError("write_beton hung")

    data = ArrayDataset(np.zeros((2, 1800, 1800, 3), np.uint8), np.arange(2))  # 9.7 MB each
    previous = signal.signal(signal.SIGALRM, hung)
    default = multiprocessing.get_start_method()
    multiprocessing.set_start_method(start_method, force=True)
    signal.alarm(120)
    try:
        with pytest.raises(UserError, match="could not be stored.*page size.*--max-resolution"):
            write_beton(data, tmp_path / "big.beton", image=image_field("raw"), num_workers=1,
                        progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        multiprocessing.set_start_method(default, force=True)
    assert list(tmp_path.iterdir()) == []  # no .beton, no .partial


def test_smart_mode_stores_big_images_as_jpeg_and_small_ones_raw(tmp_path: Path) -> None:
    """FFCV's smart mode stores every image raw unless given a threshold."""
    from ffcv.reader import Reader

    from fastibd.data.beton import image_field, write_beton

    rng = np.random.default_rng(0)
    sizes = [(300, 300), (64, 64), (257, 256), (200, 100)]  # > 256x256 pixels: JPEG
    data = [(rng.integers(0, 256, (*size, 3), dtype=np.uint8), label)
            for label, size in enumerate(sizes)]
    write_beton(data, tmp_path / "smart.beton", image=image_field("smart"), num_workers=1,
                progress=False)
    modes = Reader(str(tmp_path / "smart.beton")).metadata["f0"]["mode"].tolist()  # the image
    assert modes == [0, 1, 0, 1]  # FFCV's IMAGE_MODES: jpg 0, raw 1


def test_out_dir_empty_or_impossible_is_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    for out_dir, needle in (("", "--out-dir is empty"),
                            ("/proc/fastibd-no-such-dir", "cannot create --out-dir")):
        assert write_ffcv.main(["--dataset", "digits", "--out-dir", out_dir]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not list(Path.cwd().glob("*.beton"))


def test_a_ctrl_c_a_worker_pool_swallows_still_stops_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt raised inside a library's callback can be dropped there ("Exception
    ignored"): the writer still stops when FFCV returns, and leaves no file."""
    import signal

    from ffcv.writer import DatasetWriter

    from fastibd.data.beton import write_beton
    from fastibd.data.sources import ArrayDataset

    real = DatasetWriter.from_indexed_dataset

    def swallowing(self, *args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, handled inside the library
        except KeyboardInterrupt:
            pass
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", swallowing)
    data = ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        write_beton(data, tmp_path / "x.beton", num_workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is before  # restored
