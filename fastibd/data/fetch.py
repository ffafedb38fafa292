"""A dataset's files in --data-dir: downloaded when missing, from the host that publishes
them openly, and kept only when complete and matching the published MD5; without network
access, one line saying which files to put where.

Downloads go through fastibd.download (the one the teacher catalog uses): into
`.<name>.part`, resumed after a dropped connection or on the next run, checked, then renamed,
so a file that exists is a whole one. Archives are extracted the same way: into a temporary
folder, renamed when done.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastibd.download import download, keep
from fastibd.errors import UserError

UNPACKING_SUFFIX = ".unpacking"


@dataclass(frozen=True)
class Remote:
    """A file a dataset's host publishes: its address, its name on disk and its MD5."""

    url: str
    filename: str
    md5: str


def unavailable(dataset: str, data_dir: Path, err: object, files: str) -> UserError:
    """The one-line error for a dataset that is not in `data_dir` and cannot be downloaded:
    what went wrong and which `files` to put there instead."""
    return UserError(
        f"could not get {dataset} into {data_dir} ({err}); without network access, put "
        f"{files} in a directory and pass it as --data-dir, or use --dataset digits for the "
        "bundled offline data"
    )


def fetch(remote: Remote, data_dir: Path, dataset: str, files: str) -> Path:
    """`data_dir/remote.filename`, downloaded first when it is not there. A file already
    there is used as it is (users copy them in; a broken one fails when it is read)."""
    path = data_dir / remote.filename
    if path.is_file():
        return path

    def unreachable(reason: str, _part: Path) -> UserError:
        return unavailable(dataset, data_dir, reason, files)

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unreachable(err.strerror or str(err), path) from None
    part = download(remote.url, path, remote.filename, unreachable)
    _check_md5(part, remote, files)
    return keep(part, path)


def _check_md5(part: Path, remote: Remote, files: str) -> None:
    from torchvision.datasets.utils import calculate_md5

    got = calculate_md5(part)
    if got != remote.md5:
        part.unlink()
        raise UserError(f"{remote.url} sent a file with MD5 {got}, not the published "
                        f"{remote.md5}; nothing was kept (try again, or put {files} in "
                        "--data-dir yourself)")


def unpack(archive: Path, folder: Path) -> Path:
    """Extract the zip `archive`, whose top-level folder is `folder.name`, to `folder`."""
    staging = folder.with_name(folder.name + UNPACKING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted extraction left
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
        inside = staging / folder.name
        if not inside.is_dir():
            raise UserError(f"{archive} holds no {folder.name}/ folder")
        os.replace(inside, folder)
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # truncated or not a zip
        raise UserError(f"cannot extract {archive}: {err} (delete it to download it again)"
                        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
