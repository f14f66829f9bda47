"""A lock that keeps two trainings from writing into the same run directory.

``dir/.lock`` is held with an OS file lock (``flock`` on POSIX, ``msvcrt.locking`` on
Windows), taken without waiting: acquisition is one atomic system call, and the OS releases
the lock when its holder dies, however it dies. The pid written into the file after locking
only serves the error message of the next comer.

The holder deletes the file when it leaves, still holding the lock. A process that opened
the file just before that and locks it just after would hold a lock on a deleted file, so
after locking we check that the path still names the file we locked, and start over if not.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

__all__ = ["RunLock", "RunLockedError"]


class RunLockedError(RuntimeError):
    """The run directory is in use by another live training process."""


def _try_lock(fd: int) -> bool:
    """Take the lock on ``fd`` without waiting; False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows: lock the first byte
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):
        return False
    except OSError:  # pragma: no cover - msvcrt reports a held lock as EDEADLOCK
        if fcntl is not None:
            raise
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> str:
    """The pid recorded by the holder, or '' when unreadable (Windows locks the bytes)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


class RunLock:
    """``with RunLock(dir):`` holds ``dir/.lock`` for the block.

    A lock held by a live process (this one included) raises :class:`RunLockedError`; a
    lock file left by a process that died is simply taken, as the OS released its lock.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                pid = _holder(fd)
                os.close(fd)
                who = f"pid {pid}" if pid else "another process"
                raise RunLockedError(
                    f"output directory {self.path.parent} is in use by a running training "
                    f"({who}); choose another --out or stop that run")
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was deleted by the holder we waited for: start over
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if fcntl is not None:
            self.path.unlink(missing_ok=True)  # while still locked: see the module docstring
            os.close(fd)
        else:  # pragma: no cover - Windows cannot delete an open file
            os.close(fd)
            try:
                self.path.unlink()
            except OSError:
                pass  # another process has opened it meanwhile; it takes over
