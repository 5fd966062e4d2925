"""An exclusive lock on a run folder, so that two runs never write into the same one.

`<folder>/.lock` is locked with `fcntl.flock` and holds `{"pid", "host", "time"}` of the holder.
The kernel drops a flock when its process dies (even by kill -9), so a lock cannot outlive its
holder on the same host; a `.lock` whose recorded holder is gone is reported as stale and taken
over. A second writer is refused with an error that names the holder.

flock is advisory and local to a host on many network filesystems: the recorded pid and host are
also checked, so a live holder on this host is refused even where flock is not enforced.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (since {when})"


class RunLock:
    """Holds `<folder>/.lock` from `acquire()` until `release()` (or process exit).

    Args:
      folder: the run folder (created if missing).
      what: how the folder is named in messages (e.g. "run folder").
    """

    def __init__(self, folder: str, what: str = "run folder"):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.what = what
        self._fd: int | None = None
        self.stale: dict | None = None  # the dead holder taken over, if any

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        """Takes the lock.

        Raises:
          RunLockedError: a live process holds it (named in the message).
          NotADirectoryError: `folder` exists and is not a folder.
        """
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise NotADirectoryError(f"{self.what} {self.folder} exists and is not a folder")
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.what} {self.folder} is in use by another run: "
                f"{_describe(holder) if holder else 'unknown holder'} holds {self.path}. "
                "Wait for it to finish, stop it, or use another folder."
            ) from None
        holder = self._read(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        if holder and (holder.get("pid"), holder.get("host")) != (me["pid"], me["host"]):
            # flock is free, so the recorded holder died without releasing (kill -9, a crash).
            if holder.get("host") == me["host"] and _alive(int(holder.get("pid", -1))):
                os.close(fd)  # flock not enforced here, but the recorded holder is running
                raise RunLockedError(
                    f"{self.what} {self.folder} is in use by another run: {_describe(holder)} "
                    f"is still running and is recorded in {self.path}"
                )
            self.stale = holder
            warnings.warn(
                f"{self.what} {self.folder}: stale lock of {_describe(holder)}, which is no "
                "longer running (killed or crashed); taking it over",
                RuntimeWarning,
                stacklevel=2,
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file and unlocks it (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
