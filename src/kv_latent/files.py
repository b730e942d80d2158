"""Files that other processes may read while they are written (DESIGN.md §3.3).

Every cache, record and model directory of the project is written through these helpers, so a
reader sees either nothing, the old content or the complete new content, never a torn file, and
two processes building the same thing at once both end with one complete copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for the caller to write (by any library that takes a
    path); when the block ends it is synced and renamed onto ``path``, on an exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; caches are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, data: Any) -> None:
    """:func:`atomic_write_text` of ``data`` as indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def staged_dir(target: Path, *, complete: Callable[[Path], bool]) -> Iterator[Path | None]:
    """Build a directory in a private staging directory beside ``target``, then rename it there.

    Yields the staging directory to fill, or ``None`` when ``target`` is already complete (nothing
    to build). When the block ends, a stale ``target`` (one ``complete`` rejects: an older version,
    a crashed build) is replaced; if another process renamed its own complete copy into place
    first, that copy wins and this one is dropped. On an exception the staging directory is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    if complete(target):
        yield None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield staging
        staging.chmod(0o755)
        if target.exists() and not complete(target):
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not complete(target):  # not merely a concurrent build finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON at ``path``, or ``compute()`` written there (atomically) and returned.

    The caller puts everything the result depends on into the file name (a hash of the weights
    and settings), so a cached result is never reused for other inputs. An unreadable file (a
    crash of an older version) is recomputed.
    """
    path = Path(path)
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    result = compute()
    atomic_write_json(path, result)
    return result
