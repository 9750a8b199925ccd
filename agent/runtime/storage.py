"""Durable TinyDB storage for the small documents both sides keep (the agent's identity, the hub's metadata and node
registry): a boot counter or an accepted key written before a power cut must be there after it."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from tinydb.storages import Storage


class DurableJSONStorage(Storage):
    """TinyDB storage that replaces the file atomically and fsyncs it (TinyDB's default does neither)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return json.loads(text) if text.strip() else None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        write_private(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    def close(self) -> None:
        pass


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600 from the start, durable once this returns."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data, tmp)  # the good file is replaced only by all of it
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # an existing temporary file keeps its mode through O_CREAT
    os.replace(tmp, path)
    sync_dir(path.parent)


def write_all(fd: int, data: bytes, name: object) -> None:
    """Write all of `data` at `fd`: one write may take only part (a signal, a quota, a full disk); `name` is the file,
    for the error."""
    rest = memoryview(data)
    while rest:
        written = os.write(fd, rest)
        if written <= 0:
            raise OSError(errno.EIO, f"no progress writing {name}")
        rest = rest[written:]


def sync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the file's own fsync does not cover its name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
