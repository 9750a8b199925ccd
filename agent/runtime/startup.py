"""What an agent or hub process settles before it runs: that it alone uses its data directory, and that its first
broker connection works. Each failure is a `StartupError` whose message is the one line an operator reads.

The data directory holds one identity (key, boot counter, replay marks, outbox or journal). Two processes on it
would reuse boot numbers and interleave writes, so the second is refused: `DataLock` holds `fcntl.flock` on
DATA/lock for the life of the process. The kernel drops the lock when the process ends, however it ends, so a lock
left by kill -9 or a power cut never blocks the next start; the PID written into the file only names the holder in
the refusal. The lock is taken before anything else in the directory is touched, so a refused start changes nothing.
"""

from __future__ import annotations

import fcntl
import os
import re
import weakref
from pathlib import Path

from protocols import FleetflowError

LOCK_FILE = "lock"


class StartupError(FleetflowError):
    """The process cannot start with these settings; the message names the setting and what is wrong (exit 1)."""


def _reason(text: str) -> str:
    """'[Errno 111] Connection refused' -> 'connection refused': the part an operator acts on."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text.strip()) or "unknown error"
    return text[:1].lower() + text[1:]


class DataLock:
    """The data directory's lock, held until `release()` or the end of the process."""

    def __init__(self, data: Path, fd: int, dir_fd: int) -> None:
        self.data = data
        self._fd: int | None = fd
        # An object dropped without release() (a test that builds a hub and never runs it) still lets go of the lock.
        self._finalizer = weakref.finalize(self, _close_both, fd, dir_fd)

    @classmethod
    def acquire(cls, data: Path, setting: str = "--data") -> DataLock:
        data = Path(data)
        where = f"data directory {data} ({setting})"
        if data.exists() and not data.is_dir():
            raise StartupError(f"{where} is not a directory")
        try:
            data.mkdir(parents=True, exist_ok=True)
            if not os.access(data, os.W_OK | os.X_OK):  # root passes; a read-only file system fails the open below
                raise PermissionError(13, "Permission denied")
            # No O_TRUNC: a refused start must not wipe the PID the running holder wrote.
            fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"{where} is not writable: {_reason(exc.strerror or str(exc))}") from None
        try:
            # The directory is locked too: a lock file someone deleted or replaced while its holder runs would let a
            # second process lock the new file, but the directory stays the same inode while it holds an identity.
            dir_fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"{where} cannot be opened: {_reason(exc.strerror or str(exc))}") from None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            os.close(dir_fd)
            raise StartupError(f"{where} is in use by another fleetflow process (pid {holder}); stop it, or give "
                               f"each agent or hub its own {setting} directory") from None
        except OSError as exc:  # e.g. a network file system without locks
            os.close(fd)
            os.close(dir_fd)
            raise StartupError(f"{where} cannot be locked: {_reason(exc.strerror or str(exc))}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(data, fd, dir_fd)

    def release(self) -> None:
        if self._fd is not None:
            self._fd = None
            self._finalizer()  # closes the descriptor, which drops the lock


def _close_both(fd: int, dir_fd: int) -> None:
    os.close(fd)
    os.close(dir_fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def broker_unreachable(url: str, error: BaseException, setting: str = "--broker") -> StartupError:
    """The first connection of a process failed. Only that one ends the process (a broker lost later is retried
    with backoff): at start, a wrong URL, port or password is far likelier than an outage, and a service manager's
    restart policy retries a transient failure anyway."""
    cause = str(error.__cause__ if error.__cause__ is not None else error)
    refused = re.match(r"^\[code:(\d+)\]\s*(.*)", cause)  # the broker answered CONNECT with a refusal code
    if refused is None:
        return StartupError(f"cannot reach the broker at {url} ({setting}): {_reason(cause)}")
    code, text = int(refused.group(1)), _reason(refused.group(2) or f"code {refused.group(1)}")
    credentials = " (check --username and FLEETFLOW_PASSWORD)" if code in (4, 5, 134, 135) else ""
    return StartupError(f"the broker at {url} ({setting}) refused the connection: {text}{credentials}")
