"""An exclusive, crash-safe lock on a file: one writer of an output directory at a time.

`exclusive_lock(path, purpose)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `path` (created if needed) and
writes who holds it (pid, host, start time, purpose) into the file. The kernel releases a flock when its
holder's process ends, however it ends (SIGKILL, OOM kill), so a crashed holder never leaves the lock
stuck: its file stays behind, but a file nobody holds locks nothing. A holder that ends normally removes
the file. A second taker fails at once with `LockHeldError`, whose message names the holder.

Scope: processes that see the same file through the same kernel, or through a network filesystem that
implements flock across clients (Linux emulates flock on NFS with whole-file byte-range locks). On a
filesystem without working locks (some FUSE mounts) it only protects against writers on the same machine.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(RuntimeError):
    """The lock is held by another process; `holder` is what that process wrote (may be empty)."""

    def __init__(self, path: Path, purpose: str, holder: dict[str, object]) -> None:
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
            + (f" ({holder['purpose']})" if holder.get("purpose") else "")
            if holder
            else "a process that has not written its name yet"
        )
        super().__init__(
            f"{purpose}: the lock {path} is held by {who}. Wait for it to finish or stop it; a lock of a "
            "process that died is released automatically."
        )
        self.path = path
        self.holder = holder


def _read_holder(fd: int) -> dict[str, object]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _open_locked(path: Path, purpose: str) -> int:
    """A descriptor of `path` holding its flock. Retries when the file was replaced or removed between open
    and flock (its previous holder removes it on release), so two takers never lock two different files."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockHeldError(path, purpose, holder) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            return fd
        os.close(fd)  # we locked a file that is no longer `path`: start over


@contextmanager
def exclusive_lock(path: Path | str, purpose: str) -> Iterator[Path]:
    """Hold an exclusive lock on `path` for the duration of the `with` block.

    Args:
        path: the lock file (its parent folder must exist); created when absent and removed on release
            (a crashed holder leaves it behind, unlocked: the next taker reuses it).
        purpose: what the lock protects, for the holder record and the error message.
    Yields:
        `path`.
    Raises:
        LockHeldError: another process holds the lock (raised at once, no waiting).
    """
    path = Path(path)
    fd = _open_locked(path, purpose)
    try:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "purpose": purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiting opener then retries (see _open_locked)
        os.close(fd)  # closing the descriptor releases the flock
