"""Shared fixtures: real images (scikit-learn's digits) written as files and as .beton."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import write_ffcv


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are tiny: one intra-op thread is faster, and it does not stall on OpenMP
    barriers when another process shares the 2 cores (measured: 4 s vs 45 s for one test)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLASS_TINTS = np.array([[1.0, 0.4, 0.2], [0.2, 1.0, 0.5], [0.3, 0.5, 1.0]])


def smooth_images(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """Real handwritten digits, upsampled to `size` (W, H) and tinted: smooth like photos,
    so JPEG error stays small, and with different values in each channel."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images
    images = []
    for i in range(count):
        digit = np.round(digits[rng.integers(len(digits))] * (255 / 16)).astype(np.uint8)
        grey = np.asarray(Image.fromarray(digit).resize(size, Image.BILINEAR), dtype=np.float64)
        tint = CLASS_TINTS[i % len(CLASS_TINTS)]
        images.append(np.clip(grey[..., None] * tint + 20, 0, 255).astype(np.uint8))
    return images


def make_image_folder(
    root: Path,
    sizes: list[tuple[int, int]],
    classes: tuple[str, ...] = ("cat", "dog", "emu"),
    per_class: int = 4,
) -> Path:
    """An ImageFolder tree root/{train,val}/<class>/ of PNG and JPEG files; image k of a class
    is PNG when k is even, JPEG otherwise, and has size sizes[k % len(sizes)]."""
    for split_index, split in enumerate(("train", "val")):
        for class_index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                seed = 1000 * split_index + 100 * class_index + k
                (image,) = smooth_images(1, sizes[k % len(sizes)], seed)
                ext = "png" if k % 2 == 0 else "jpg"
                Image.fromarray(image).save(folder / f"img{k}.{ext}", quality=95)
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.beton / val.beton of the bundled digits, written through the real CLI."""
    out = tmp_path_factory.mktemp("digits")
    args = ["--dataset", "digits", "--out-dir", str(out), "--num-workers", "2"]
    assert write_ffcv.main(args) == 0
    return out


REPO = Path(__file__).resolve().parent.parent


def cli_error(main: Callable[[list[str]], int], argv: list[str],
              capsys: pytest.CaptureFixture) -> str:
    """Run a command's `main(argv)` on bad input: it must exit with 2 and print exactly one
    line, no traceback. Returns that line."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors exit from inside parse_args
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def train_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m fastibd.train ARGS` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "fastibd.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_runs(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The README demo's runs, through the real CLI: a PGD-AT teacher, the IBD student
    distilled from it, and a `standard` student (same data, no attack) for comparison."""
    root = tmp_path_factory.mktemp("smoke")
    data = [f"--data.train_path={digits_dir / 'train.beton'}",
            f"--data.val_path={digits_dir / 'val.beton'}", "--logging.progress=false"]
    runs = {name: root / name for name in ("teacher", "ibd", "standard")}
    commands = {
        "teacher": ["--cfg", "smoke_teacher"],
        "ibd": ["--cfg", "smoke", f"--teacher.path={runs['teacher'] / 'best.pt'}"],
        "standard": ["--cfg", "smoke", "--loss.mode=standard"],
    }
    for name, command in commands.items():
        result = train_cli(*command, *data, f"--training.out_dir={runs[name]}")
        assert result.returncode == 0, result.stderr[-3000:]
        (runs[name] / "stdout.txt").write_text(result.stdout)
    return runs
