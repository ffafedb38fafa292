"""Turn a dataset into FFCV files: OUT_DIR/train.beton and OUT_DIR/val.beton (or, with
--format npz, OUT_DIR/train.npz and OUT_DIR/val.npz for machines without FFCV).

Examples:
  python data_prep/write_ffcv.py --dataset digits                  # bundled, offline
  python data_prep/write_ffcv.py --dataset cifar10 --format npz    # no FFCV needed to train
  python data_prep/write_ffcv.py --dataset cifar10 --data-dir ~/data/cifar
  python data_prep/write_ffcv.py --dataset svhn --data-dir ~/data/svhn
  python data_prep/write_ffcv.py --dataset tiny-imagenet --data-dir ~/data   # tiny-imagenet-200/
  python data_prep/write_ffcv.py --dataset imagenet --data-dir /data/imagenet \\
      --out-dir /data/ffcv/imagenet --max-resolution 500 --compress-probability 0.5
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data_prep/write_ffcv.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastibd.cli import ArgumentParser, bounded, writable_directory
from fastibd.data import sources as datasets
from fastibd.data.beton import WRITE_MODES, image_field, write_beton
from fastibd.data.tensor_loader import write_npz
from fastibd.errors import UserError, exit_on_user_error

DATASETS = ("cifar10", "cifar100", "svhn", "tiny-imagenet", "imagenet", "folder", "digits")
FOLDER_DATASETS = ("imagenet", "folder")
DOWNLOADS = Path("data/downloads")  # --data-dir of the datasets that download themselves

# FFCV's ImageNet recipe (ffcv-imagenet, ResNet-50 rows); small datasets are stored raw.
FOLDER_DEFAULTS = {"write_mode": "proportion", "max_resolution": 500,
                   "jpeg_quality": 90, "compress_probability": 0.5}
SMALL_DEFAULTS = {"write_mode": "raw", "max_resolution": None,
                  "jpeg_quality": 90, "compress_probability": 0.5}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="write_ffcv.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=DATASETS, default="cifar10",
                        help="cifar10/cifar100/svhn: torchvision's files (downloaded into "
                             "--data-dir when missing); tiny-imagenet: tiny-imagenet-200/ as "
                             "distributed (or its zip, downloaded when missing); imagenet/folder: "
                             "an ImageFolder tree with train/ and val/ (val's classes a subset of "
                             "train's); digits: scikit-learn's bundled digits, 32x32 RGB, offline "
                             "(default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where the source data is (or is downloaded to, for cifar10, "
                             f"cifar100, svhn and tiny-imagenet; default {DOWNLOADS}). Required "
                             "for imagenet/folder")
    parser.add_argument("--out-dir", default=None,
                        help="where train.beton and val.beton go (default data/DATASET)")
    parser.add_argument("--format", choices=("beton", "npz"), default="beton",
                        help="beton: FFCV files (any dataset); npz: uint8 arrays the trainer "
                             "keeps on the GPU, for machines without FFCV (same-size images "
                             "only: cifar10, cifar100, svhn, tiny-imagenet, digits) (default: "
                             "%(default)s)")
    parser.add_argument("--num-workers", type=bounded(int, 1), default=min(16, os.cpu_count() or 1),
                        help="writer processes (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (otherwise refuse)")
    parser.add_argument("--limit", type=bounded(int, 1), default=None, metavar="N",
                        help="write only N samples of each split, evenly spaced in stored "
                             "order (a class-sorted folder keeps its classes' spread), for "
                             "quick trials")
    images = parser.add_argument_group(
        "image storage (FFCV RGBImageField); defaults: imagenet/folder use FFCV's ImageNet "
        "recipe (proportion, 500px, q90, 0.5), the others are stored raw at full size")
    images.add_argument("--write-mode", choices=WRITE_MODES, default=None,
                        help="raw pixels, jpg, a proportion of jpgs, or smart (jpg for "
                             "images of more than 256x256 pixels, raw for smaller ones)")
    images.add_argument("--max-resolution", type=bounded(int, 8), default=None, metavar="PX",
                        help="downscale so the longer side is at most PX")
    images.add_argument("--jpeg-quality", type=bounded(int, 1, 100), default=None, metavar="Q",
                        help="JPEG quality 1..100")
    images.add_argument("--compress-probability", type=bounded(float, 0.0, 1.0), default=None,
                        metavar="P", help="fraction of images stored as JPEG in proportion mode")
    return parser


def load_splits(dataset: str, data_dir: Path | None) -> dict[str, datasets.ImageDataset]:
    if dataset == "digits":
        return {split: datasets.digits_dataset(split) for split in datasets.SPLITS}
    if dataset in FOLDER_DATASETS:
        if data_dir is None:
            raise UserError(f"--dataset {dataset} needs --data-dir pointing at a folder "
                            "with train/ and val/ inside")
        return datasets.folder_splits(data_dir)
    root = data_dir if data_dir is not None else DOWNLOADS
    if dataset == "tiny-imagenet":
        return datasets.tiny_imagenet_splits(root)
    if dataset == "svhn":
        return {split: datasets.svhn_dataset(root, split) for split in datasets.SPLITS}
    return {split: datasets.cifar_dataset(dataset, root, split) for split in datasets.SPLITS}


def limited(size: int, limit: int | None) -> list[int]:
    """The samples --limit keeps: `limit` of `size`, evenly spaced in stored order, so a
    source stored class by class (folders, Tiny-ImageNet) keeps samples of all its classes
    (when `limit` is not below their number and they are not very uneven), not the first."""
    if limit is None or limit >= size:
        return list(range(size))
    return np.linspace(0, size - 1, limit).round().astype(int).tolist()


def stack_images(data: datasets.ImageDataset, indices: list[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The samples at `indices` as one uint8 [N, H, W, 3] array and their labels."""
    images, labels = [], []
    for index in tqdm(indices, unit="img", leave=False, file=sys.stderr):
        image, label = data[index]
        if images and image.shape != images[0].shape:
            raise UserError(f"--format npz needs images of one size; image {index} is "
                            f"{image.shape[1]}x{image.shape[0]}, image 0 is "
                            f"{images[0].shape[1]}x{images[0].shape[0]} (use --format beton)")
        images.append(image)
        labels.append(label)
    return np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64)


@exit_on_user_error("write_ffcv.py")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out_dir is not None and not args.out_dir.strip():
        raise UserError("--out-dir is empty: name the folder train and val go to")
    out_dir = Path(args.out_dir) if args.out_dir is not None else Path("data") / args.dataset
    outputs = {split: out_dir / f"{split}.{args.format}" for split in datasets.SPLITS}
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.overwrite:  # checked before any slow work
        raise UserError(f"{', '.join(existing)} already exists; pass --overwrite to replace")
    writable_directory(out_dir, "--out-dir", create=False)  # made once the sources are read

    defaults = FOLDER_DEFAULTS if args.dataset in FOLDER_DATASETS else SMALL_DEFAULTS
    storage = {key: defaults[key] if getattr(args, key) is None else getattr(args, key)
               for key in defaults}
    splits = load_splits(args.dataset, args.data_dir)
    writable_directory(out_dir, "--out-dir")  # now made: the sources are there
    for split, data in splits.items():
        indices = limited(len(data), args.limit)
        print(f"{args.dataset} {split}: {len(indices)} images -> {outputs[split]}", flush=True)
        if args.format == "npz":
            write_npz(outputs[split], *stack_images(data, indices))
            continue
        write_beton(data, outputs[split], image=image_field(**storage),
                    indices=None if args.limit is None else indices,
                    num_workers=args.num_workers, overwrite=args.overwrite)
    for path in outputs.values():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
