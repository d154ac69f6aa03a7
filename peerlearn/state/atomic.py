"""Atomic file writes: a reader sees the old file or the new one, never a mix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, chunks, mode: int = 0o644) -> None:
    """Writes the byte chunks to path atomically and durably.

    The data goes to a temporary file in the same directory, is fsynced, and
    is renamed over path; the directory is fsynced so the rename survives a
    crash. On any failure the temporary file is removed and path is untouched.
    """
    path = Path(path)
    # A directory made here holds what only this user should read (keys,
    # checkpoints): 0700, as `peerlearn run` makes its data dir.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
