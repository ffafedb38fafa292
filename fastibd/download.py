"""Resumable HTTP(S) downloads, for the datasets (fastibd.data.fetch) and the teacher catalog
(fastibd.models.catalog).

`download(url, target, ...)` fetches into `.<name>.part` beside the target, resuming with a
Range request after a dropped or stalled connection (and on the next run, from the part a
killed one left), and returns the part once the server has sent the whole file. The caller
checks it against what it knows (a size, an MD5, a sha256) and renames it into place with
`keep`, so a file at the target name is always whole.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastibd.errors import UserError

CHUNK = 1 << 20
TIMEOUT_S = 60  # per socket operation: a stalled server is a failed try, not a hang
TRIES = 5  # connections per download; each one resumes where the last stopped


def part_path(target: Path) -> Path:
    """Where the bytes of `target` collect while they download."""
    return target.with_name(f".{target.name}.part")


def download(url: str, target: Path, name: str,
             unreachable: Callable[[str, Path], UserError], progress: bool = True,
             tries: int = TRIES) -> Path:
    """The complete `part_path(target)` of `url` (the caller checks it, then `keep`s it).

    `unreachable(reason, part)` makes the error for a server that cannot be reached or
    refuses (no network, HTTP 404, a web page instead of a file); `name` labels the progress
    bar and the error after `tries` connections that all stopped short."""
    part = part_path(target)
    last = "the server sent less than it said"
    for attempt in range(tries):
        before = _size(part)
        try:
            if _transfer(url, part, before, progress, name, unreachable):
                return part
        except (http.client.HTTPException, OSError) as err:
            # the connection dropped or stalled mid-transfer: the next try resumes
            last = str(err) or type(err).__name__
        if _size(part) == before and attempt + 1 < tries:
            time.sleep(1.0)  # no progress at all: give the server a moment
    raise UserError(f"the download of {name} from {url} stopped at {_size(part)} bytes after "
                    f"{tries} tries ({last}); run the command again to resume from {part}")


def keep(part: Path, target: Path) -> Path:
    """Rename a checked download into place."""
    os.replace(part, target)
    return target


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _transfer(url: str, part: Path, have: int, progress: bool, name: str,
              unreachable: Callable[[str, Path], UserError]) -> bool:
    """One request for the bytes of `url` from `have` on, appended to `part`; whether `part`
    is now the whole file (as long as the server says, or all it sent when it does not say:
    the caller's size and digest then judge)."""
    headers = {"User-Agent": "fastibd", **({"Range": f"bytes={have}-"} if have else {})}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part is no prefix the server knows: start again
            part.unlink()
            return False
        raise unreachable(f"HTTP {err.code} {err.reason}", part) from None
    except urllib.error.URLError as err:  # no connection at all: no network, a bad host
        raise unreachable(str(err.reason), part) from None
    with response:
        if response.headers.get_content_type() == "text/html":
            raise unreachable("the server answered with a web page, not a file", part)
        have, total = _offset_and_total(response, have)
        _append(response, part, have, total, progress, name)
    return total is None or _size(part) == total


def _offset_and_total(response: Any, have: int) -> tuple[int, int | None]:
    """Where the response's bytes go in the file, and the file's whole size if known."""
    length = response.headers.get("Content-Length")
    if response.status != 206:  # the whole file: the server ignored the Range, or none was sent
        return 0, int(length) if length is not None else None
    # 206: "Content-Range: bytes START-END/TOTAL" (TOTAL may be *)
    found = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)",
                         response.headers.get("Content-Range", "").strip())
    if found is None or int(found.group(1)) > have:
        raise http.client.HTTPException("a partial response that does not continue the file")
    start = int(found.group(1))
    total = int(found.group(2)) if found.group(2) != "*" else None
    if total is None and length is not None:
        total = start + int(length)
    return start, total


def _append(response: Any, part: Path, have: int, total: int | None, progress: bool,
            name: str) -> None:
    from tqdm import tqdm

    part.parent.mkdir(parents=True, exist_ok=True)
    with part.open("r+b" if part.exists() else "wb") as file, \
            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=name, disable=not progress, leave=False) as bar:
        file.seek(have)
        file.truncate()
        while chunk := response.read(CHUNK):
            file.write(chunk)
            bar.update(len(chunk))
        file.flush()
        os.fsync(file.fileno())
