"""write_ffcv.py's SVHN, Tiny-ImageNet and ImageFolder readers, on tiny synthetic copies of
the real on-disk layouts: images, labels, class order, downloads (from a server on
127.0.0.1 only) and the errors users hit."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from data_prep import write_ffcv
from fastibd.data import LoaderOptions, make_loader
from fastibd.models import build_model
from tests.conftest import make_image_folder, smooth_images
from tests.test_write_ffcv import assert_one_line_error, read_all, run_cli

CLOSED = "http://127.0.0.1:9"  # a closed local port: "no network", the same everywhere
OFFLINE = {"http_proxy": CLOSED, "https_proxy": CLOSED, "HTTP_PROXY": CLOSED,
           "HTTPS_PROXY": CLOSED, "no_proxy": "", "NO_PROXY": ""}
SVHN_SIZES = {"train_32x32.mat": 13, "test_32x32.mat": 11}  # both reach label 10
# wnids.txt as distributed is not sorted; labels follow the sorted order.
WNIDS = ("n02124075", "n01443537", "n09246464")


def write(args: list[str], out: Path, *extra: str) -> int:
    return write_ffcv.main([*args, "--out-dir", str(out), "--num-workers", "2", *extra])


def in_process_error(code: int, capsys: pytest.CaptureFixture, *needles: str) -> None:
    """`write_ffcv.main` failed with one error line, the last thing on stderr."""
    result = subprocess.CompletedProcess([], code, "", capsys.readouterr().err)
    assert_one_line_error(result, *needles)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["images"], data["labels"]


# SVHN ----------------------------------------------------------------------------------

def svhn_mat(path: Path, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN-layout .mat file: 'X' uint8 [32, 32, 3, N], 'y' [N, 1] in 1..10 (10 is digit
    0). Returns the images as [N, 32, 32, 3] and the raw labels."""
    images = np.stack(smooth_images(count, (32, 32), seed))
    labels = np.arange(count) % 10 + 1  # every label 1..10 appears
    savemat(str(path), {"X": images.transpose(1, 2, 3, 0), "y": labels[:, None]})
    return images, labels


@pytest.fixture
def svhn_dir(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    root = tmp_path / "svhn"
    root.mkdir()
    written = {name: svhn_mat(root / name, count, seed=count)
               for name, count in SVHN_SIZES.items()}
    return root, {"train": written["train_32x32.mat"], "val": written["test_32x32.mat"]}


def test_svhn_round_trip_maps_label_10_to_0(tmp_path: Path, svhn_dir) -> None:
    root, source = svhn_dir
    assert write(["--dataset", "svhn", "--data-dir", str(root)], tmp_path / "out") == 0
    for split, (images, labels) in source.items():
        got_images, got_labels = read_all(tmp_path / "out" / f"{split}.beton")
        assert np.array_equal(got_images, images)  # stored raw: exact
        assert got_labels.tolist() == [label % 10 for label in labels]
        assert 10 in labels and 0 in got_labels.tolist() and got_labels.max() == 9


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving the folder it returns (with its base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    thread.join()


def serve_svhn(monkeypatch: pytest.MonkeyPatch, base: str, served: Path,
               md5: str | None = None) -> dict[str, bytes]:
    """Point torchvision's SVHN file table at SVHN-layout files on the local server."""
    from torchvision.datasets import SVHN

    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy in the environment must not apply
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    contents = {}
    for split, (name, count) in zip(("train", "test"), SVHN_SIZES.items(), strict=True):
        svhn_mat(served / name, count, seed=count)
        contents[name] = (served / name).read_bytes()
        digest = md5 or hashlib.md5(contents[name]).hexdigest()
        monkeypatch.setitem(SVHN.split_list, split, [f"{base}/{name}", name, digest])
    return contents


def test_svhn_downloads_missing_files(tmp_path: Path, local_server,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base, served = local_server
    contents = serve_svhn(monkeypatch, base, served)
    data_dir = tmp_path / "dl"
    assert write(["--dataset", "svhn", "--data-dir", str(data_dir), "--format", "npz"],
                 tmp_path / "out") == 0
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == contents  # nothing else
    images, labels = load_npz(tmp_path / "out" / "val.npz")
    assert len(labels) == SVHN_SIZES["test_32x32.mat"] and labels.max() == 9
    assert images.shape[1:] == (32, 32, 3)


def test_svhn_download_continues_from_what_a_killed_run_left(
        tmp_path: Path, local_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `.part` a killed download left is continued, or, from this server, which ignores
    Range requests and sends the whole file, overwritten: either way the file kept is the
    published one (MD5-checked) and no part remains."""
    base, served = local_server
    contents = serve_svhn(monkeypatch, base, served)
    data_dir = tmp_path / "dl"
    data_dir.mkdir()
    (data_dir / ".train_32x32.mat.part").write_bytes(b"stale" * 100)
    assert write(["--dataset", "svhn", "--data-dir", str(data_dir), "--format", "npz"],
                 tmp_path / "out") == 0
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == contents


def test_svhn_download_with_the_wrong_md5_keeps_nothing(
        tmp_path: Path, local_server, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    base, served = local_server
    serve_svhn(monkeypatch, base, served, md5="0" * 32)
    data_dir = tmp_path / "dl"
    code = write(["--dataset", "svhn", "--data-dir", str(data_dir)], tmp_path / "out")
    in_process_error(code, capsys, "train_32x32.mat", "MD5", "not the published 000")
    assert list(data_dir.iterdir()) == []  # no partial file to mistake for the dataset
    assert not (tmp_path / "out").exists()


def test_svhn_without_network_says_where_the_files_go(tmp_path: Path) -> None:
    result = run_cli("--dataset", "svhn", "--data-dir", str(tmp_path / "dl"),
                     "--out-dir", str(tmp_path / "out"), env=OFFLINE)
    assert_one_line_error(result, "could not get svhn", "train_32x32.mat and test_32x32.mat",
                          "--data-dir")
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "dl").iterdir()) == []


def test_svhn_file_that_is_not_a_mat_file(tmp_path: Path, svhn_dir,
                                          capsys: pytest.CaptureFixture) -> None:
    root, _ = svhn_dir
    (root / "test_32x32.mat").write_bytes(b"<html>moved</html>")
    code = write(["--dataset", "svhn", "--data-dir", str(root)], tmp_path / "out")
    in_process_error(code, capsys, "cannot read", "test_32x32.mat", "delete it")


# Tiny-ImageNet -------------------------------------------------------------------------

def make_tiny_imagenet(root: Path, per_class: int = 3, val_per_class: int = 2) -> Path:
    """tiny-imagenet-200's layout with 64x64 JPEGs: wnids.txt (unsorted),
    train/<wnid>/images/<wnid>_<k>.JPEG (+ the boxes file), val/images/val_<i>.JPEG with
    val/val_annotations.txt (file, wnid, box; classes interleaved), and an unlabelled test/.
    The first val image is greyscale, as some real ones are."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in WNIDS))
    for index, wnid in enumerate(WNIDS):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k, image in enumerate(smooth_images(per_class, (64, 64), seed=index)):
            Image.fromarray(image).save(images / f"{wnid}_{k}.JPEG", quality=95)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, image in enumerate(smooth_images(val_per_class * len(WNIDS), (64, 64), seed=99)):
        picture = Image.fromarray(image)
        (picture.convert("L") if i == 0 else picture).save(root / "val" / "images" /
                                                           f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % len(WNIDS)]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    Image.fromarray(smooth_images(1, (64, 64), seed=7)[0]).save(root / "test" / "images" /
                                                                 "test_0.JPEG")
    return root


def tiny_expected(root: Path, split: str) -> tuple[np.ndarray, list[int]]:
    """What the reader must produce, worked out independently: labels by sorted wnid."""
    order = sorted(WNIDS)
    if split == "train":
        files = [(f, order.index(w)) for w in order
                 for f in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    else:
        rows = [line.split("\t") for line in
                (root / "val" / "val_annotations.txt").read_text().splitlines()]
        files = [(root / "val" / "images" / name, order.index(wnid)) for name, wnid, *_ in rows]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    return images, [label for _, label in files]


def test_tiny_imagenet_round_trip_labels_by_sorted_wnid(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "src" / "tiny-imagenet-200")
    out = tmp_path / "out"
    assert write(["--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "src")], out) == 0
    for split in ("train", "val"):
        images, labels = read_all(out / f"{split}.beton")
        expected_images, expected_labels = tiny_expected(root, split)
        assert labels.tolist() == expected_labels
        assert np.array_equal(images, expected_images)  # raw: what PIL decodes, 64x64 RGB
    assert labels.tolist() == [1, 0, 2, 1, 0, 2]  # val_i is WNIDS[i % 3]; sorted: 1, 0, 2
    assert (images[0][..., 0] == images[0][..., 2]).all()  # the greyscale one, as RGB


def test_tiny_imagenet_betons_train_through_the_cifar_pipeline_at_64px(tmp_path: Path) -> None:
    make_tiny_imagenet(tmp_path / "src")  # data-dir may also be the folder itself
    out = tmp_path / "out"
    assert write(["--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "src")], out) == 0
    loader = make_loader(out / "train.beton", "cifar", "train",
                         LoaderOptions(batch_size=4, num_workers=2, seed=0))
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    for arch in ("resnet18", "preact_resnet18"):
        model = build_model(arch, num_classes=200, width_mult=1 / 8).eval()
        logits, taps = model(x, features=True)
        assert logits.shape == (4, 200)
        assert taps[-1].shape[-2:] == (8, 8)  # twice the 4x4 of a 32-px input


def test_tiny_imagenet_is_extracted_from_its_zip(tmp_path: Path) -> None:
    tree = make_tiny_imagenet(tmp_path / "tree" / "tiny-imagenet-200")
    data_dir = tmp_path / "dl"
    data_dir.mkdir()
    with zipfile.ZipFile(data_dir / "tiny-imagenet-200.zip", "w") as zipped:
        for path in sorted(tree.rglob("*")):
            zipped.write(path, path.relative_to(tree.parent))
    out = tmp_path / "out"
    assert write(["--dataset", "tiny-imagenet", "--data-dir", str(data_dir), "--format", "npz"],
                 out) == 0
    assert sorted(p.name for p in data_dir.iterdir()) == ["tiny-imagenet-200",
                                                          "tiny-imagenet-200.zip"]
    images, labels = load_npz(out / "train.npz")
    expected_images, expected_labels = tiny_expected(tree, "train")
    assert labels.tolist() == expected_labels and np.array_equal(images, expected_images)


def test_tiny_imagenet_truncated_zip_is_one_line_and_extracts_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = tmp_path / "dl"
    data_dir.mkdir()
    (data_dir / "tiny-imagenet-200.zip").write_bytes(b"PK\x03\x04 cut short")
    code = write(["--dataset", "tiny-imagenet", "--data-dir", str(data_dir)], tmp_path / "out")
    in_process_error(code, capsys, "cannot extract", "tiny-imagenet-200.zip", "delete it")
    assert [p.name for p in data_dir.iterdir()] == ["tiny-imagenet-200.zip"]


def test_tiny_imagenet_without_network_says_where_the_files_go(tmp_path: Path) -> None:
    result = run_cli("--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "dl"),
                     "--out-dir", str(tmp_path / "out"), env=OFFLINE)
    assert_one_line_error(result, "could not get tiny-imagenet", "tiny-imagenet-200.zip",
                          "tiny-imagenet-200/", "--data-dir")
    assert list((tmp_path / "dl").iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (lambda root: (root / "val" / "val_annotations.txt").write_text(
            "val_0.JPEG\tn00000001\t0\t0\t63\t63\n"), ["line 1", "n00000001", "wnids.txt"]),
        (lambda root: (root / "val" / "images" / "val_1.JPEG").unlink(),
         ["line 2", "no image", "val_1.JPEG"]),
        (lambda root: (root / "train" / "n99999999" / "images").mkdir(parents=True),
         ["does not match", "n99999999"]),
        (lambda root: (root / "wnids.txt").unlink(), ["wnids.txt"]),
    ],
    ids=["unknown-wnid", "missing-image", "extra-train-folder", "no-wnids"],
)
def test_tiny_imagenet_layout_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                     damage, needles: list[str]) -> None:
    root = make_tiny_imagenet(tmp_path / "src" / "tiny-imagenet-200", per_class=1,
                              val_per_class=1)
    damage(root)
    code = write(["--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "src")],
                 tmp_path / "out")
    in_process_error(code, capsys, *needles)
    assert not (tmp_path / "out").exists()


# ImageFolder ---------------------------------------------------------------------------

def test_folder_val_classes_may_be_a_subset_labelled_by_name(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "src", sizes=[(16, 16)])  # cat, dog, emu
    for file in (root / "val" / "cat").iterdir():
        file.unlink()
    (root / "val" / "cat").rmdir()
    out = tmp_path / "out"
    assert write(["--dataset", "folder", "--data-dir", str(root), "--format", "npz"], out) == 0
    _, train_labels = load_npz(out / "train.npz")
    _, val_labels = load_npz(out / "val.npz")
    assert sorted(set(train_labels.tolist())) == [0, 1, 2]
    assert val_labels.tolist() == [1] * 4 + [2] * 4  # dog and emu keep train's labels


def test_folder_val_class_absent_from_train_is_named(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    root = make_image_folder(tmp_path / "src", sizes=[(16, 16)])
    (root / "val" / "yak").mkdir()
    Image.fromarray(smooth_images(1, (16, 16), seed=3)[0]).save(root / "val" / "yak" / "a.png")
    code = write(["--dataset", "folder", "--data-dir", str(root)], tmp_path / "out")
    in_process_error(code, capsys, "yak", "not among the 3 training classes")
    assert not (tmp_path / "out").exists()
