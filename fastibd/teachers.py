"""`python -m fastibd.teachers`: the teacher catalog (fastibd/models/catalog.yaml).

    python -m fastibd.teachers list
    python -m fastibd.teachers show NAME
    python -m fastibd.teachers fetch NAME --to DIR
    python -m fastibd.teachers verify FILE --name NAME [--data VAL.beton]

The catalog and the download are fastibd.models.catalog's, the loading and the published-
accuracy check fastibd.models.teachers'. This entry module holds the command's `main`
itself: `verify` reads images (fastibd.data), which the models layer may not import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastibd.cli import ArgumentParser, bounded
from fastibd.data import dataset_labels, first_examples
from fastibd.device import resolve_device
from fastibd.errors import UserError, exit_on_user_error
from fastibd.eval.evaluate import check_classes, check_resolution, evaluation_crop
from fastibd.models import NORMALIZATIONS, TappedModel, default_pipeline
from fastibd.models.catalog import (
    CatalogEntry,
    catalog_entry,
    fetch,
    load_catalog,
)
from fastibd.models.checkpoint import sha256_file
from fastibd.models.teachers import (
    accuracy_by_normalization,
    better_normalization,
    load_checkpoint,
    lowest_plausible_accuracy,
    published_shortfall,
)

PROG = "fastibd.teachers"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, default=None,
                        help="a catalog file of your own (default: the one shipped)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="every teacher: dataset, architecture, published accuracy")
    show = commands.add_parser("show", help="everything the catalog says about one teacher")
    show.add_argument("name")
    get = commands.add_parser("fetch", help="download a teacher's file (resumable), record "
                                            "its sha256")
    get.add_argument("name")
    get.add_argument("--to", type=Path, required=True, help="directory to put it in")
    get.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify = commands.add_parser("verify", help="check a file is the teacher it should be: "
                                                "sha256, layout, classes, clean accuracy")
    verify.add_argument("file", type=Path)
    verify.add_argument("--name", required=True, help="the catalog entry it should be")
    verify.add_argument("--data", type=Path, default=None,
                        help="held-out images (.beton or .npz) to measure clean accuracy on "
                             "(default: no measurement)")
    verify.add_argument("--n", type=bounded(int, 1), default=1000,
                        help="measure on the first N images")
    verify.add_argument("--batch-size", type=bounded(int, 1), default=200)
    verify.add_argument("--workers", type=bounded(int, 1), default=4,
                        help="FFCV decoding threads")
    verify.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    verify.add_argument("--trust-pickle", action="store_true",
                        help="allow a full pickle (robustness-library files): it can run "
                             "code, so only for files you trust")
    return parser


def list_teachers(catalog: Path | None) -> None:
    rows = [("name", "dataset", "arch", "eps", "clean", "robust", "format", "from")]
    for entry in load_catalog(catalog).values():
        rows.append((entry.name, entry.dataset, entry.arch, f"{entry.threat_model} {entry.eps}",
                     _percent(entry.clean_acc), _percent(entry.robust_acc),
                     entry.format + (" (pickle)" if entry.full_pickle else ""),
                     "url" if entry.url else "RobustBench"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def show_teacher(entry: CatalogEntry) -> None:
    lines = [
        ("name", entry.name), ("title", entry.title),
        ("data", f"{entry.dataset}, {entry.num_classes} classes"),
        ("threat", f"{entry.threat_model} eps {entry.eps}"),
        ("arch", entry.arch), ("format", entry.format + (
            " (a full pickle: loading it needs --teacher.trust_pickle=true)"
            if entry.full_pickle else "")),
        ("normalization", entry.normalization),
        ("clean", _percent(entry.clean_acc)),
        ("robust", f"{_percent(entry.robust_acc)}"
                   + (f" ({entry.robust_attack})" if entry.robust_attack else "")),
        ("published in", entry.accuracy_source or "unknown"),
        ("url", entry.url or "none (RobustBench's)"),
        ("robustbench", f"{entry.robustbench.model} ({entry.dataset}, {entry.threat_model}), "
                        f"Google Drive id {entry.robustbench.gdrive_id}"
         if entry.robustbench else "no"),
        ("bytes", str(entry.bytes) if entry.bytes is not None else "unknown"),
        ("sha256", entry.sha256 or "unknown (fetch prints the one it saw)"),
        ("get it", entry.how_to_get()),
        ("train with", f"--teacher.name={entry.name} --teacher.path=DIR/{entry.file}"),
        ("note", entry.note or "-"),
    ]
    for label, text in lines:
        print(f"{label:<14}{text}")


def fetch_teacher(entry: CatalogEntry, directory: Path, progress: bool) -> None:
    got = fetch(entry, directory, progress=progress)
    print(f"{'already there' if got.already_there else 'saved'}  {got.path} ({got.bytes} bytes)")
    known = ("matches the catalog" if entry.sha256 else
             "the catalog states none" + ("" if got.already_there else
                                          f"; recorded in {got.path}.sha256"))
    print(f"sha256  {got.sha256} ({known})")


def verify_teacher(args: argparse.Namespace, entry: CatalogEntry) -> None:
    digest = sha256_file(args.file) if args.file.is_file() else None
    if digest is not None and entry.sha256 is not None and digest != entry.sha256:
        raise UserError(f"{args.file} has sha256 {digest}, not the catalog's {entry.sha256} "
                        f"for {entry.name}: a different or damaged file")
    loaded = load_checkpoint(entry.arch, args.file, entry.format,
                             num_classes=entry.num_classes, normalization=entry.normalization,
                             trust_pickle=args.trust_pickle)
    print(f"teacher  {entry.name}: {entry.title}")
    print(f"file     {args.file}, {args.file.stat().st_size} bytes, sha256 {digest}"
          f" ({'matches the catalog' if entry.sha256 else 'the catalog states none'})")
    print(f"read as  {loaded.format}: {entry.arch}, {entry.num_classes} classes, "
          f"normalization {entry.normalization}")
    if args.data is None:
        print("clean    not measured (pass --data VAL.beton to compare it with the published "
              f"{_percent(entry.clean_acc)})")
    else:
        measured, total = measure_clean_accuracy(loaded.model, entry, args)
        expected = ("nothing published" if entry.clean_acc is None else
                    f"published {entry.clean_acc:.2f}%, refused below "
                    f"{lowest_plausible_accuracy(entry.clean_acc / 100, total):.1%}")
        print(f"clean    {measured:.1%} of {total} images of {args.data} ({expected})")
    for note in loaded.notes:  # after the verdict: a refusal stays one line
        print(f"note: {note}", file=sys.stderr)
    print("ok")


def measure_clean_accuracy(model: TappedModel, entry: CatalogEntry,
                           args: argparse.Namespace) -> tuple[float, int]:
    """Clean accuracy of `model` on the first `args.n` images of `args.data`, refused when
    far below `entry`'s published one (saying which normalization does better, if one does)."""
    device = resolve_device(args.device, "--device")
    labels = dataset_labels(args.data)
    check_classes(labels, entry.num_classes, args.data, args.file)
    pipeline = default_pipeline(entry.arch)
    resolution, _, _ = check_resolution(model.spec, pipeline, args.data, None, False, args.file)
    total = min(args.n, len(labels))
    batches = first_examples(args.data, pipeline, total, args.batch_size, device, resolution,
                             args.workers, evaluation_crop(model.spec, pipeline, None))
    model = model.to(device)
    measured = next(iter(accuracy_by_normalization(model, batches, ())[0].values()))
    shortfall = published_shortfall(measured, total, entry)
    if shortfall:
        accuracy, _ = accuracy_by_normalization(model, batches, NORMALIZATIONS)
        best = better_normalization(accuracy)
        hint = f"; with normalization {best} it gets {accuracy[best]:.1%}" if best else ""
        raise UserError(f"{args.file} gets {measured:.1%} of {total} images of {args.data} "
                        f"right; {shortfall}{hint}")
    return measured, total


def _percent(value: float | None) -> str:
    return f"{value:.2f}%" if value is not None else "unknown"


@exit_on_user_error(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        list_teachers(args.catalog)
        return 0
    entry = catalog_entry(args.name, args.catalog)
    if args.command == "show":
        show_teacher(entry)
    elif args.command == "fetch":
        fetch_teacher(entry, args.to, progress=not args.no_progress)
    else:
        verify_teacher(args, entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
