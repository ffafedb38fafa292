"""The teacher catalog (catalog.yaml beside this file): the robust models people distil
from, how each file is laid out, where to get it and what it is published to score.

    entry = catalog_entry("Zhang2019Theoretically")  # a one-line error listing the names
    fetched = fetch(entry, Path("models"))           # resumable download, sha256 checked

`fetch` downloads an entry's `url` over HTTP(S) with fastibd.download: into `.<file>.part`
beside the target, resuming with a Range request after a dropped connection (and on the
next run), then checked against the sizes and sha256 the server and the catalog state, and
renamed into place, so a file at the target name is always whole. RobustBench's files live on Google
Drive, which needs RobustBench's own downloader: `fetch` calls it when it is installed and
says how otherwise. The sha256 of what it got is printed and written to `<file>.sha256`.
"""

from __future__ import annotations

import difflib
import functools
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastargs.validation import Checker

from fastibd.cli import parse_number, writable_directory
from fastibd.download import TRIES, download, keep
from fastibd.errors import UserError, first_line
from fastibd.models import ARCHITECTURES, NORMALIZATIONS
from fastibd.models.checkpoint import atomic_write_text, sha256_file

DEFAULT_CATALOG = Path(__file__).with_name("catalog.yaml")
# The layouts a teacher file comes in. fastibd.models.teachers reads each (its FORMATS adds
# "auto"); they are declared here, below the loader, so the catalog can check its entries.
FILE_FORMATS = ("fastibd", "state_dict", "robustbench", "robustness")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RobustBenchSource:
    """A file RobustBench distributes: its model id and the Google Drive id its zoo lists."""

    model: str
    gdrive_id: str


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    dataset: str
    num_classes: int
    arch: str
    format: str
    normalization: str
    threat_model: str
    eps: str  # as published: "8/255", "0.031"
    full_pickle: bool = False
    url: str | None = None
    robustbench: RobustBenchSource | None = None
    bytes: int | None = None  # None: no public source states it
    sha256: str | None = None
    clean_acc: float | None = None  # percent
    robust_acc: float | None = None
    robust_attack: str | None = None
    accuracy_source: str | None = None
    note: str = ""

    @property
    def file(self) -> str:
        """Where the file goes under a directory: RobustBench's own layout for its files
        (so `robustbench.utils.load_model(model_dir=DIR)` finds it too), else the URL's name."""
        if self.robustbench is not None and self.url is None:
            return f"{self.dataset}/{self.threat_model}/{self.robustbench.model}.pt"
        return Path(urllib.parse.urlparse(self.url).path).name

    def robustbench_command(self, directory: Path | str) -> str:
        assert self.robustbench is not None
        return (f"python -c \"from robustbench.utils import load_model; load_model("
                f"model_name='{self.robustbench.model}', dataset='{self.dataset}', "
                f"threat_model='{self.threat_model}', model_dir='{directory}')\"")

    def how_to_get(self, path: str = "") -> str:
        """One line saying how to get the file: to `path` when it ends in `self.file`."""
        ours, theirs = Path(self.file).parts, Path(path).parts
        directory = str(Path(*theirs[:-len(ours)])) if theirs[-len(ours):] == ours else "DIR"
        command = (f"python -m fastibd.teachers fetch {self.name} --to {directory} (it "
                   f"writes {directory}/{self.file})")
        if self.url is not None:
            return f"{command}, or download {self.url}"
        return f"{command}, which needs RobustBench, or {self.robustbench_command(directory)}"


# ------------------------------------------------------------------------- reading the file

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "title": (str,), "dataset": (str,), "num_classes": (int,), "arch": (str,),
    "format": (str,), "normalization": (str,), "threat_model": (str,), "eps": (str, float),
    "full_pickle": (bool,), "url": (str,), "robustbench": (dict,), "bytes": (int,),
    "sha256": (str,), "clean_acc": (float, int), "robust_acc": (float, int),
    "robust_attack": (str,), "accuracy_source": (str,), "note": (str,),
}
_REQUIRED = ("title", "dataset", "num_classes", "arch", "format", "normalization",
             "threat_model", "eps")


def load_catalog(path: Path | str | None = None) -> dict[str, CatalogEntry]:
    """Every entry of the catalog at `path` (default: the one shipped), checked; a problem
    is a one-line UserError naming the file, the entry and the field. Parsed once per
    version of the file (reading settings looks names up in it many times)."""
    path = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        stat = path.stat()
    except OSError:
        stat = None  # _read says why
    version = (stat.st_mtime_ns, stat.st_size) if stat is not None else None
    return dict(_parsed(path, version))


@functools.lru_cache(maxsize=8)
def _parsed(path: Path, version: tuple[int, int] | None) -> tuple[tuple[str, CatalogEntry], ...]:
    del version  # part of the cache key only: a rewritten file is parsed again
    tree = _read(path)
    return tuple((str(name), _entry(str(name), raw, path)) for name, raw in tree.items())


def catalog_entry(name: str, path: Path | str | None = None) -> CatalogEntry:
    """The entry called `name`; a name not in the catalog is one line listing the names."""
    entries = load_catalog(path)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"no teacher {name!r} in the catalog; {hint}known: "
                        f"{', '.join(entries)} (python -m fastibd.teachers list)")
    return entries[name]


class CatalogName(Checker):
    """A setting naming a catalog entry (or empty), checked when the settings are read."""

    def check(self, value: Any) -> str:
        if value in ("", None):
            return ""
        if str(value) not in load_catalog():
            raise ValueError(value)
        return str(value)

    def help(self) -> str:
        return "empty or a teacher in the catalog: " + ", ".join(load_catalog())


def _read(path: Path) -> dict[str, Any]:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read the teacher catalog {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
        raise UserError(f"{path} should map each teacher's name to its fields")
    return tree


def _entry(name: str, raw: dict[str, Any], path: Path) -> CatalogEntry:
    def bad(problem: str) -> UserError:
        return UserError(f"{path}: teacher {name}: {problem}")

    unknown = sorted(set(raw) - set(_FIELD_TYPES))
    missing = [key for key in _REQUIRED if key not in raw]
    if unknown or missing:
        raise bad(f"unknown fields {', '.join(unknown)}" if unknown
                  else f"missing {', '.join(missing)}")
    for key, value in raw.items():
        types = _FIELD_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise bad(f"{key} should be {' or '.join(t.__name__ for t in types)}, "
                      f"got {value!r}")
    values = dict(raw, eps=str(raw["eps"]))
    if "robustbench" in raw:
        values["robustbench"] = _robustbench(raw["robustbench"], bad)
    for key in ("clean_acc", "robust_acc"):
        if key in raw:
            values[key] = float(raw[key])
    entry = CatalogEntry(name=name, **values)
    problem = _problem(entry)
    if problem:
        raise bad(problem)
    return entry


def _robustbench(raw: dict[str, Any], bad: Callable[[str], UserError]
                 ) -> RobustBenchSource:
    if set(raw) != {"model", "gdrive_id"} or not all(isinstance(v, str) for v in raw.values()):
        raise bad(f"robustbench should be {{model: ID, gdrive_id: ID}}, got {raw!r}")
    return RobustBenchSource(**raw)


def _problem(entry: CatalogEntry) -> str | None:
    """What is wrong with an entry whose fields have the right types, if anything."""
    checks = [
        (entry.arch in ARCHITECTURES, f"arch {entry.arch!r} is not one of "
                                      f"{', '.join(ARCHITECTURES)}"),
        (entry.format in FILE_FORMATS, f"format {entry.format!r} is not one of "
                                       f"{', '.join(FILE_FORMATS)}"),
        (entry.normalization in NORMALIZATIONS, f"normalization {entry.normalization!r} is "
                                                f"not one of {', '.join(NORMALIZATIONS)}"),
        (entry.num_classes >= 2, "num_classes should be at least 2"),
        (_valid_eps(entry.eps), f"eps {entry.eps!r} should be a number in (0, 1], e.g. 8/255"),
        (entry.url is not None or entry.robustbench is not None, "say where to get it: url "
                                                                 "or robustbench"),
        (entry.sha256 is None or _SHA256.fullmatch(entry.sha256) is not None,
         "sha256 should be 64 lowercase hex digits"),
        (entry.bytes is None or entry.bytes > 0, "bytes should be positive"),
        (all(0 <= acc <= 100 for acc in (entry.clean_acc, entry.robust_acc) if acc is not None),
         "accuracies are percentages, in [0, 100]"),
        # a published number is only as good as where it was published
        ((entry.clean_acc is None and entry.robust_acc is None) or bool(entry.accuracy_source),
         "give accuracy_source for the published accuracy"),
        (entry.robust_acc is None or bool(entry.robust_attack),
         "say which attack robust_acc was measured with (robust_attack)"),
    ]
    return next((message for ok, message in checks if not ok), None)


def _valid_eps(text: str) -> bool:
    try:
        return 0 < parse_number(text) <= 1
    except (ValueError, ZeroDivisionError):
        return False


# ---------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    bytes: int
    already_there: bool  # nothing was downloaded


def fetch(entry: CatalogEntry, directory: Path, progress: bool = True,
          tries: int = TRIES) -> Fetched:
    """Get `entry`'s file into `directory` (at `entry.file`), checked against the catalog's
    size and sha256 when it states them; a file already there is checked, not fetched."""
    target = directory / entry.file
    if target.is_file():
        digest = sha256_file(target)
        _check_digest(entry, digest, target, "is already there but")
        return Fetched(target, digest, target.stat().st_size, already_there=True)
    writable_directory(target.parent, "--to", create=False)  # made once there is a file
    if entry.url is not None:
        digest = _download(entry, target, progress, tries)
    else:
        _fetch_with_robustbench(entry, directory, target)
        digest = sha256_file(target)
        _check_digest(entry, digest, target, "was downloaded by RobustBench but", remove=True)
    atomic_write_text(target.with_name(target.name + ".sha256"), f"{digest}  {target.name}\n")
    return Fetched(target, digest, target.stat().st_size, already_there=False)


def _check_digest(entry: CatalogEntry, digest: str, path: Path, what: str,
                  remove: bool = False) -> None:
    if entry.sha256 is not None and digest != entry.sha256:
        if remove:
            path.unlink()
        kept = "removed it" if remove else "remove it and fetch again"
        raise UserError(f"{path} {what} its sha256 is {digest}, not the catalog's "
                        f"{entry.sha256} for {entry.name}: a different or damaged file; {kept}")


def _download(entry: CatalogEntry, target: Path, progress: bool, tries: int) -> str:
    """Download entry.url to `target` (fastibd.download: resumable); the sha256 of the file."""
    assert entry.url is not None

    def unreachable(reason: str, part: Path) -> UserError:
        return _no_download(entry, part, reason)

    part = download(entry.url, target, entry.name, unreachable, progress, tries)
    return _finish(entry, part, target)


def _finish(entry: CatalogEntry, part: Path, target: Path) -> str:
    """Check the whole download against the catalog, then rename it into place."""
    size, digest = part.stat().st_size, sha256_file(part)
    if entry.bytes is not None and size != entry.bytes:
        part.unlink()
        raise UserError(f"the download of {entry.name} has {size} bytes, the catalog says "
                        f"{entry.bytes}: not kept; run the command again")
    if entry.sha256 is not None and digest != entry.sha256:
        part.unlink()
        raise UserError(f"the download of {entry.name} has sha256 {digest}, the catalog says "
                        f"{entry.sha256}: not kept (a changed or damaged file at {entry.url})")
    keep(part, target)
    return digest


def _no_download(entry: CatalogEntry, part: Path, reason: str) -> UserError:
    target = part.with_name(part.name[1:-len(".part")])
    resume = f" (run it again to resume {part})" if part.exists() else ""
    return UserError(f"cannot download {entry.name} from {entry.url} ({reason}){resume}; "
                     f"without network, put the file at {target} yourself and check it with "
                     f"python -m fastibd.teachers verify {target} --name {entry.name}")


def _fetch_with_robustbench(entry: CatalogEntry, directory: Path, target: Path) -> None:
    assert entry.robustbench is not None
    yourself = (f"put the file at {target} yourself (run {entry.robustbench_command(directory)}"
                f" where there is network) and check it with python -m fastibd.teachers "
                f"verify {target} --name {entry.name}")
    try:
        from robustbench.utils import load_model
    except ImportError:
        raise UserError(f"{entry.name} is on Google Drive (id {entry.robustbench.gdrive_id}), "
                        "which only RobustBench's downloader fetches: pip install "
                        "git+https://github.com/RobustBench/robustbench.git and run this "
                        f"again, or {yourself}") from None
    try:
        load_model(model_name=entry.robustbench.model, dataset=entry.dataset,
                   threat_model=entry.threat_model, model_dir=str(directory))
    except Exception as err:  # noqa: BLE001 - network, Drive quota, a RobustBench version
        raise UserError(f"RobustBench could not get {entry.name} ({first_line(err)}); "
                        f"{yourself}"
                        ) from None
    if not target.is_file():
        raise UserError(f"RobustBench did not write {target}; {yourself}")
