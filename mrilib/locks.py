"""One writer per folder: an advisory lock that frees itself when its process ends.

The synthetic cache and the grid's results folders take it before writing. A second
writer is turned away at once rather than made to wait: the first may hold the folder
for hours, and whoever started the second should know now (docs/decisions.md, "One
writer per results folder").
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class FolderBusy(ValueError):
    """Another process holds the folder's lock."""


@contextmanager
def folder_lock(directory: str | os.PathLike, busy: str) -> Iterator[Path]:
    """Hold ``directory``'s lock for the block, else raise :class:`FolderBusy` (``busy``).

    ``busy`` may name ``{pid}`` (the holder's process id, as it wrote it in the lock file)
    and ``{lock}`` (the lock file's path). Yields the folder.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(busy.format(pid=holder(lock), lock=lock)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield directory
    finally:
        os.close(fd)  # closing releases the lock; so does the process dying


def holder(lock: Path, wait_s: float = 0.5) -> str:
    """The pid the holder of ``lock`` wrote, or ``"unknown"``. A holder writes it just
    after taking the lock, so an empty file is read again for up to ``wait_s``."""
    import time

    give_up = time.monotonic() + wait_s
    while True:
        try:
            pid = lock.read_text().strip()
        except OSError:
            return "unknown"
        if pid or time.monotonic() > give_up:
            return pid or "unknown"
        time.sleep(0.01)
