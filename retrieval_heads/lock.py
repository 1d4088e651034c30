"""The exclusive lock on a results directory (its ``.lock`` file): one writer per run.

``flock`` where the platform has it (the kernel drops a dead holder's lock, so a stale file never
blocks), else an O_EXCL pid file whose holder is checked for liveness; either way the file says
who holds it (pid, host, time), for the :class:`~retrieval_heads.files.ResultsLocked` message.

It never reads or writes anything but that one file; :class:`~retrieval_heads.store.ResultsDir`
takes and releases it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from retrieval_heads.files import LOCK_FILE, ResultsLocked, _dumps, _now

try:  # POSIX advisory locks; the lock falls back to a pid file where they are missing
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class _DirLock:
    """An exclusive lock on a directory: ``flock`` on ``.lock`` (released by the kernel when the
    holder dies, so a stale file never blocks), or where ``fcntl`` is missing, an O_EXCL pid file
    whose holder is checked for liveness. The file holds the holder's pid, host and start time."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info.get('pid')} on {info.get('host')} since {info.get('time')}"
        except (OSError, ValueError, AttributeError):
            return "another process"

    def _busy(self) -> ResultsLocked:
        return ResultsLocked(
            f"results directory {self.path.parent} is in use by {self._holder()} "
            f"(lock file {self.path}); wait for it to finish, or write to another directory"
        )

    def _info(self) -> str:
        return _dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": _now()})

    def acquire(self) -> None:
        if fcntl is None:  # Windows
            self._acquire_pidfile()
            return
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except OSError:  # a filesystem without flock (some network mounts)
                os.close(fd)
                self._acquire_pidfile()
                return
            # The holder before us may have unlinked the file between our open and our flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, self._info().encode())
                    os.fsync(fd)
                except BaseException:  # e.g. a full disk: do not keep the flock on a dead fd
                    os.close(fd)
                    raise
                self._fd = fd
                return
            os.close(fd)
        raise self._busy()

    def _acquire_pidfile(self) -> None:
        """O_EXCL create; a lock left by a dead process on this host is stale and replaced."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text(encoding="utf-8"))
                    stale = info.get("host") == socket.gethostname() and not _pid_alive(
                        int(info.get("pid"))
                    )
                except (OSError, ValueError, TypeError, AttributeError):
                    stale = False
                if not stale:
                    raise self._busy() from None
                self.path.unlink(missing_ok=True)
                continue
            try:
                os.write(fd, self._info().encode())
            except BaseException:  # an empty pid file would block every later writer
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self._fd = -1
            return
        raise self._busy()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
