"""Data-loading benchmark, FFCV vs torchvision: `python -m fastibd.bench_data`.

Both loaders get the same synthetic images, augmentation, worker count, batch size and
device, and are measured in one run:
  - cifar:    32x32 RGB; train augmentation = random crop with 4 px zero padding + flip.
              FFCV reads a raw .beton, torchvision an ImageFolder tree of PNG files.
  - imagenet: RGB JPEGs of random sizes (300-500 px a side); train augmentation =
              RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) to --resolution + flip.
              FFCV reads a .beton of JPEGs (default --imagenet-write-mode jpg, so both sides
              decode a JPEG per image), torchvision an ImageFolder tree of JPEG files.

The FFCV side is exactly what training runs (`fastibd.data.make_loader(..., "train")`):
FFCV decodes, then for cifar the crop and flip run on the device (fastibd.data.augment),
for imagenet FFCV's random resized crop and flip run in its pipeline. The torchvision side
is `ImageFolder` + `transforms.v2` in a `DataLoader` (shuffled, persistent worker
processes, pinned memory on cuda), which augments on the CPU as the paper's code does.

What is timed, for both: reading from the OS page cache (the files were just written, so no
disk I/O), decoding, augmentation, batching, the host-to-device copy, and the conversion of
the uint8 batch to float32 in [0, 1] in channels_last layout on the device, i.e. everything
until a batch is ready for a training step, and nothing of the step itself. Images and labels
both end on the device.

What is not timed: writing the data; the first epoch, a warm-up during which FFCV compiles its
pipeline (8-15 s) and torchvision starts its workers. The time to the first batch of that
epoch is reported separately as "first batch s". Rates are images per second over --epochs
full passes after it.

Differences that remain: FFCV's workers are threads of this process (numba), torchvision's are
processes; FFCV resizes with OpenCV (INTER_AREA), torchvision with PIL / antialiased bilinear.
The torchvision batch's float conversion runs in this process with torch's thread count as a
training run has it (fastibd.data keeps FFCV from changing it; the table's last line says it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from fastibd.cli import ArgumentParser, bounded, choice_list, comma_list, writable_file
from fastibd.data import CIFAR_PAD, LoaderOptions
from fastibd.device import resolve_device, synchronize
from fastibd.errors import UserError, exit_on_user_error

PROG = "fastibd.bench_data"
SCHEMA_VERSION = 1
SHAPES = ("cifar", "imagenet")
LOADERS = ("torchvision", "ffcv")
# Small enough that a default run takes 1-2 minutes on a 2-core CPU (most of it FFCV's
# one-time compilation); raise them for steadier numbers on a bigger machine.
DEFAULT_IMAGES = {"cifar": 2000, "imagenet": 400}
DEFAULT_BATCH = {"cifar": 256, "imagenet": 64}
CIFAR_SIDE = 32
IMAGENET_SIDES = (300, 500)  # each side drawn uniformly from this range, like real photos
JPEG_QUALITY = 90  # FFCV's ImageNet recipe; the torchvision JPEGs use the same
MAX_CLASSES = 10
IMAGENET_WRITE_MODES = ("jpg", "proportion", "raw")


@dataclass(frozen=True)
class Result:
    """One (dataset shape, loader) measurement."""

    dataset: str
    loader: str
    images: int  # dataset size
    batch_size: int
    epochs: int
    images_seen: int  # counted batch by batch over the timed epochs
    seconds: float  # the timed epochs
    images_per_s: float
    first_batch_s: float  # loader creation to the first batch (FFCV compiles here)
    batch_shape: list[int]  # of the first batch, as a training step receives it
    dtype: str
    device: str
    value_range: list[float]


@dataclass(frozen=True)
class LoadSetup:
    """How both loaders read the synthetic data (bench_step reuses it for its loaders)."""

    workers: int
    device: str
    seed: int = 0
    resolution: int = 160  # imagenet output size
    torchvision_decode: str = "pil"
    imagenet_write_mode: str = "jpg"
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadSetup:
        return cls(args.workers, args.device, args.seed, args.resolution,
                   args.torchvision_decode, args.imagenet_write_mode, not args.no_progress)


# ----------------------------------------------------------------------------- parsing


def parse_shapes(text: str) -> tuple[str, ...]:
    """'cifar,imagenet' -> ('cifar', 'imagenet'): known names, no repeats, at least one."""
    return tuple(choice_list(text, SHAPES, "dataset shape"))


def per_shape_count(text: str) -> dict[str, int]:
    """'N' (every shape) or 'cifar=N,imagenet=M' (shapes not named keep their default)."""
    positive = bounded(int, 1)
    if "=" not in text:
        value = positive(text)
        return dict.fromkeys(SHAPES, value)
    counts = {}
    for item in comma_list(text):
        name, _, value = item.partition("=")
        if name.strip() not in SHAPES:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected NAME=N with NAME one of {', '.join(SHAPES)}")
        counts[name.strip()] = positive(value.strip())
    return counts


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=parse_shapes, default=SHAPES, metavar="LIST",
                        help="dataset shapes to benchmark (default: cifar,imagenet)")
    parser.add_argument("--n-images", type=per_shape_count, default={}, metavar="N",
                        help="images per dataset: N for all, or cifar=N,imagenet=M "
                             "(default: cifar=2000,imagenet=400)")
    parser.add_argument("--batch-size", type=per_shape_count, default={}, metavar="N",
                        help="batch size: N for all, or cifar=N,imagenet=M "
                             "(default: cifar=256,imagenet=64)")
    parser.add_argument("--epochs", type=bounded(int, 1), default=2,
                        help="timed passes over each dataset, after one warm-up pass "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=bounded(int, 1), default=LoaderOptions.num_workers,
                        help="FFCV threads = torchvision worker processes, also used to write "
                             "the data (default: %(default)s)")
    parser.add_argument("--resolution", type=bounded(int, 8, 1024), default=160,
                        help="imagenet output size in pixels (default: %(default)s)")
    parser.add_argument("--imagenet-write-mode", choices=IMAGENET_WRITE_MODES, default="jpg",
                        help="how the imagenet .beton stores images: jpg (like the JPEG files), "
                             "proportion (FFCV's recipe: half JPEG, half raw) or raw "
                             "(default: %(default)s)")
    parser.add_argument("--torchvision-decode", choices=("pil", "tensor"), default="pil",
                        help="pil: ImageFolder's default PIL loader; tensor: "
                             "torchvision.io.decode_image (libjpeg-turbo / libpng) "
                             "(default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where batches end up (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the synthetic data are written and kept (default: a "
                             "temporary folder, removed afterwards)")
    parser.add_argument("--seed", type=bounded(int, 0), default=0,
                        help="seed of the images and of the shuffles (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------- data


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour blobs plus fine grain, uint8 HxWx3. Pure noise would be unlike a photo:
    JPEG would store it at several times a photo's size and decode it that much slower."""
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3),
                          dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                        dtype=np.float32)
    grain = rng.normal(0.0, 6.0, size=smooth.shape).astype(np.float32)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def image_size(shape: str, rng: np.random.Generator) -> tuple[int, int]:
    if shape == "cifar":
        return CIFAR_SIDE, CIFAR_SIDE
    low, high = IMAGENET_SIDES
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def write_folder(root: Path, shape: str, count: int, seed: int, progress: bool) -> Path:
    """An ImageFolder tree root/<class>/<image> of `count` images (PNG for cifar, JPEG for
    imagenet), classes assigned round robin."""
    rng = np.random.default_rng(seed)
    classes = min(MAX_CLASSES, count)  # ImageFolder rejects a class folder with no image
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True)
    suffix = "png" if shape == "cifar" else "jpg"
    for index in tqdm(range(count), desc=f"{shape}: writing {suffix} files", unit="img",
                      disable=not progress, file=sys.stderr, leave=False):
        image = Image.fromarray(synthetic_image(rng, *image_size(shape, rng)))
        path = root / f"class{index % classes}" / f"{index:06d}.{suffix}"
        if suffix == "jpg":
            image.save(path, quality=JPEG_QUALITY)
        else:
            image.save(path)  # PNG: lossless, like CIFAR's own files
    return root


def write_beton_from(folder: Path, path: Path, shape: str, write_mode: str,
                     workers: int, progress: bool = True) -> Path:
    """The same images as a .beton, read back from the folder so both loaders see the same
    pixels (for imagenet that is one more JPEG generation, as when converting real data)."""
    from fastibd.data.beton import image_field, write_beton
    from fastibd.data.sources import FolderDataset

    mode = "raw" if shape == "cifar" else write_mode
    field = image_field(write_mode=mode, jpeg_quality=JPEG_QUALITY, compress_probability=0.5)
    return write_beton(FolderDataset(folder), path, image=field, num_workers=workers,
                       progress=progress)


def prepare(work_dir: Path, shape: str, count: int, setup: LoadSetup) -> Path:
    """Write work_dir/shape/{images/, train.beton}; return the shape's folder."""
    root = work_dir / shape
    print(f"{shape}: writing {count} images to {root}", file=sys.stderr, flush=True)
    write_folder(root / "images", shape, count, setup.seed, setup.progress)
    write_beton_from(root / "images", root / "train.beton", shape, setup.imagenet_write_mode,
                     setup.workers, setup.progress)
    return root


# ----------------------------------------------------------------------------- loaders


def ffcv_batches(root: Path, shape: str, batch_size: int, setup: LoadSetup) -> Iterable:
    """The project's training loader (fastibd.data.make_loader), yielding float [0, 1]
    channels_last batches on the device."""
    from fastibd.data import make_loader

    options = LoaderOptions(batch_size=batch_size, device=setup.device,
                            num_workers=setup.workers, seed=setup.seed)
    return make_loader(root / "train.beton", shape, "train", options,
                       resolution=setup.resolution)


def torchvision_transform(shape: str, resolution: int) -> Callable:
    from torchvision.transforms import v2

    crop = (v2.RandomCrop(CIFAR_SIDE, padding=CIFAR_PAD) if shape == "cifar"
            else v2.RandomResizedCrop(resolution, antialias=True))
    # ToImage turns a PIL image into a uint8 CHW tensor (a decoded tensor passes through);
    # ToDtype guarantees uint8 so the batch crosses to the device at a quarter of float's size.
    return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.ToImage(),
                       v2.ToDtype(torch.uint8, scale=True)])


def decode_rgb(path: str) -> Tensor:
    """ImageFolder loader for --torchvision-decode tensor: a uint8 CHW RGB tensor."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(path, mode=ImageReadMode.RGB)


class TorchvisionBatches:
    """ImageFolder + DataLoader, finished like the FFCV pipeline: on the device, float [0, 1],
    channels_last."""

    def __init__(self, root: Path, shape: str, batch_size: int, setup: LoadSetup,
                 memory_format: torch.memory_format = torch.channels_last) -> None:
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        tensor = setup.torchvision_decode == "tensor"
        extra: dict[str, Any] = {"loader": decode_rgb} if tensor else {}
        dataset = ImageFolder(str(root / "images"),
                              transform=torchvision_transform(shape, setup.resolution), **extra)
        self.device = torch.device(setup.device)
        self.memory_format = memory_format
        # Persistent workers: FFCV keeps its threads across epochs too, so neither side pays
        # a start-up per epoch inside the timed part.
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                 num_workers=setup.workers, persistent_workers=True,
                                 pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(setup.seed))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            # One kernel for layout and dtype, then scale in place: what FFCV's ToTorchImage,
            # Convert and Normalize steps do.
            images = images.to(dtype=torch.float32, memory_format=self.memory_format)
            yield images.div_(255), labels.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.loader)


# ----------------------------------------------------------------------------- timing


def count_epoch(batches: Iterator[tuple[Tensor, Tensor]], bar: tqdm) -> int:
    """Draw every remaining batch of an epoch; return how many images came out."""
    seen = 0
    for images, labels in batches:
        if len(images) != len(labels):
            raise RuntimeError(f"batch of {len(images)} images but {len(labels)} labels")
        seen += len(images)
        bar.update(len(images))
    return seen


def describe(images: Tensor) -> dict[str, Any]:
    """What a training step would receive, to show both loaders deliver the same thing."""
    return {"batch_shape": list(images.shape), "dtype": str(images.dtype).removeprefix("torch."),
            "device": str(images.device),
            "value_range": [float(images.min()), float(images.max())]}


def measure(make: Callable[[], Iterable], shape: str, loader_name: str, count: int,
             batch_size: int, args: argparse.Namespace) -> Result:
    """One warm-up epoch (its first batch timed alone), then `args.epochs` timed epochs."""
    device = torch.device(args.device)
    bar = tqdm(total=count * (args.epochs + 1), desc=f"{shape}: {loader_name}", unit="img",
               disable=args.no_progress, file=sys.stderr, leave=False)
    with bar:
        start = time.perf_counter()
        loader = make()
        batches = iter(loader)
        images, labels = next(batches)
        synchronize(device)
        first_batch_s = time.perf_counter() - start
        bar.update(len(images))
        first = describe(images)  # now: FFCV overwrites this buffer with the next batch
        count_epoch(batches, bar)

        seen = 0
        start = time.perf_counter()
        for _ in range(args.epochs):
            seen += count_epoch(iter(loader), bar)
        synchronize(device)
        seconds = time.perf_counter() - start
    return Result(dataset=shape, loader=loader_name, images=count, batch_size=batch_size,
                  epochs=args.epochs, images_seen=seen, seconds=seconds,
                  images_per_s=seen / max(seconds, 1e-9), first_batch_s=first_batch_s, **first)


def bench_shape(work_dir: Path, shape: str, args: argparse.Namespace) -> list[Result]:
    count = args.n_images.get(shape, DEFAULT_IMAGES[shape])
    batch_size = args.batch_size.get(shape, DEFAULT_BATCH[shape])
    setup = LoadSetup.from_args(args)
    root = prepare(work_dir, shape, count, setup)
    makers = {
        "torchvision": lambda: TorchvisionBatches(root, shape, batch_size, setup),
        "ffcv": lambda: ffcv_batches(root, shape, batch_size, setup),
    }
    return [measure(makers[name], shape, name, count, batch_size, args) for name in LOADERS]


# ----------------------------------------------------------------------------- report


def ratios(results: list[Result]) -> dict[str, float]:
    """FFCV images/s over torchvision images/s, per dataset shape."""
    rate = {(r.dataset, r.loader): r.images_per_s for r in results}
    return {shape: rate[shape, "ffcv"] / rate[shape, "torchvision"]
            for shape in dict.fromkeys(r.dataset for r in results)}


def format_table(results: list[Result], args: argparse.Namespace) -> str:
    speedup = ratios(results)
    header = ("dataset", "loader", "images", "batch", "output", "first batch s", "timed s",
              "images/s", "vs torchvision")
    rows = [header]
    for r in results:
        output = "x".join(str(side) for side in r.batch_shape[1:])
        ratio = speedup[r.dataset] if r.loader == "ffcv" else 1.0
        rows.append((r.dataset, r.loader, str(r.images), str(r.batch_size), output,
                     f"{r.first_batch_s:.2f}", f"{r.seconds:.2f}", f"{r.images_per_s:,.0f}",
                     f"{ratio:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 1, 4}  # text columns; numbers are right-aligned
    lines = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"(workers {args.workers}, device {args.device}, {args.epochs} timed epochs "
                 f"after a warm-up one, torch threads {torch.get_num_threads()}, "
                 f"torchvision decoding with {args.torchvision_decode})")
    return "\n".join(lines)


def report(results: list[Result], args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    config = {"datasets": list(args.datasets), "epochs": args.epochs, "workers": args.workers,
              "resolution": args.resolution, "device": args.device, "seed": args.seed,
              "imagenet_write_mode": args.imagenet_write_mode,
              "torchvision_decode": args.torchvision_decode}
    environment = {"python": platform.python_version(), "torch": version("torch"),
                   "torchvision": version("torchvision"), "ffcv": version("ffcv"),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    return {"schema_version": SCHEMA_VERSION, "config": config, "environment": environment,
            "results": [asdict(r) for r in results], "ffcv_over_torchvision": ratios(results)}


# ----------------------------------------------------------------------------- main


def check_args(args: argparse.Namespace) -> None:
    """Problems found before any slow work."""
    resolve_device(args.device, "--device")
    if args.json is not None:
        writable_file(args.json, "--json", example="bench.json")
    if args.work_dir is not None:
        if args.work_dir.exists() and not args.work_dir.is_dir():
            raise UserError(f"--work-dir {args.work_dir} is not a directory")
        taken = [str(args.work_dir / s) for s in args.datasets if (args.work_dir / s).exists()]
        if taken:
            raise UserError(f"{', '.join(taken)} already exists; give a new or empty --work-dir")


@exit_on_user_error(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fastibd-bench-"))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        results = [r for shape in args.datasets for r in bench_shape(work_dir, shape, args)]
    finally:
        if args.work_dir is None:  # ours, not the user's: remove even after an error
            shutil.rmtree(work_dir, ignore_errors=True)
    print(format_table(results, args))
    if args.json is not None:
        args.json.write_text(json.dumps(report(results, args), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
