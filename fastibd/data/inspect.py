"""Look inside a dataset file through the training loader: `python -m fastibd.inspect_data FILE`.

Prints what a training step would receive (shape, dtype, layout, value range), the label
histogram, and the loader's throughput over one full epoch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastibd.cli import ArgumentParser, bounded
from fastibd.data import PIPELINES, LoaderOptions, dataset_labels, dataset_resolution, make_loader
from fastibd.errors import exit_on_user_error


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fastibd.inspect_data", description=__doc__)
    parser.add_argument("path", type=Path,
                        help="a .beton or .npz written by data_prep/write_ffcv.py")
    parser.add_argument("--pipeline", choices=PIPELINES, default="cifar",
                        help="cifar: crop+flip at stored size; imagenet: random resized crop")
    parser.add_argument("--resolution", type=bounded(int, 8), default=224,
                        help="output size of the imagenet pipeline (default: %(default)s)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=256)
    parser.add_argument("--num-workers", type=bounded(int, 1), default=LoaderOptions.num_workers)
    return parser


@exit_on_user_error("inspect_data")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dataset_labels(args.path)  # the checks train and evaluate make: readable, right fields
    if args.pipeline == "cifar":
        dataset_resolution(args.path)  # one size, square (the imagenet pipeline takes any)
    options = LoaderOptions(batch_size=args.batch_size, num_workers=args.num_workers)
    loader = make_loader(args.path, args.pipeline, "train", options, resolution=args.resolution)
    counts: dict[int, int] = {}
    low, high, seen, timed = float("inf"), float("-inf"), 0, 0
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc=f"reading {args.path.name}", unit="batch"):
        if seen == 0:
            first = images
            start = time.perf_counter()  # exclude FFCV's one-time pipeline compilation
        else:
            timed += len(labels)
        seen += len(labels)
        low, high = min(low, images.min().item()), max(high, images.max().item())
        for label, count in zip(*torch.unique(labels, return_counts=True), strict=True):
            counts[int(label)] = counts.get(int(label), 0) + int(count)
    elapsed = time.perf_counter() - start
    print(f"samples       {seen} in {len(loader)} batches")
    layout = first.is_contiguous(memory_format=torch.channels_last)
    print(f"images        {tuple(first.shape)} {first.dtype} on {first.device}, "
          f"channels_last={layout}, range [{low:.3f}, {high:.3f}]")
    print(f"labels        {len(counts)} classes: "
          + " ".join(f"{k}:{v}" for k, v in sorted(counts.items())))
    print(f"throughput    {timed / max(elapsed, 1e-9):,.0f} images/s (after the first batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
