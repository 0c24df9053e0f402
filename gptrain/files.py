"""Files that are either complete or absent: written under a temporary name, synced, then renamed.

Every output a crash could leave half-written goes through here: checkpoints, prepare's token files and
metadata, the metrics log rewritten on resume, the run record, harness results. A reader (or a resumed
run) then sees the previous file or the new one, never a truncated one.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, rename it over `path`, then fsync the
    directory, so that the rename itself survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # beside the target, so the rename stays on one file system (and is atomic); named .<name>.*.tmp
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; an output is shared like any other file
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a complete, synced file over `path` and make the rename durable: for files assembled in place
    (prepare's token files), which atomic_write's one call cannot produce."""
    os.replace(tmp, path)
    sync_directory(Path(path).parent)


def sync_directory(directory: str | Path) -> None:
    """fsync a directory, so the names created, renamed or removed in it are on disk, not only their data."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(path: str | Path) -> None:
    """Delete the temporary files that writers of `path` killed mid-write left beside it (a write that ends,
    even by an exception, leaves none): for a command that owns `path`, when it starts writing there again."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)
