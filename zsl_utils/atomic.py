"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

The bytes go to a temporary sibling (same file system), are fsync-ed and renamed onto the target with ``os.replace``
(atomic on POSIX); the directory is fsync-ed so the rename survives a crash. A temporary name carries
``<host>-<pid>-<random>`` after :data:`TMP_MARKER`: a cleaner tells a dead writer's leftovers from a live one's."""
from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

TMP_MARKER = ".tmp-"


def temporary_sibling(target: Path) -> Path:
    """``<dir>/.<name>.tmp-<host>-<pid>-<random>``: where ``target`` is written first."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return target.with_name(f".{target.name}{TMP_MARKER}{tag}")


def fsync_directory(directory: Path) -> None:
    """Persist a rename in ``directory`` (best effort: not every OS allows opening dirs)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(target: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``target`` by ``write(handle)`` on a temporary sibling renamed into place; on error nothing changes."""
    target = Path(target)
    tmp = temporary_sibling(target)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_directory(target.parent)
    return target


def write_text_atomically(target: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomically` for UTF-8 text, creating the parent folder if needed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(target, lambda handle: handle.write(text.encode("utf-8")))
