"""`artifact.install` and `artifact.rollback`: content-addressed files the hub signed, fetched, checked, then switched
to atomically. Off until the agent's config enables them (`[artifacts] enabled = true`).

An install goes through these phases, and nothing the node runs changes before the last one:

1. verify: the manifest (hex, in `with.manifest`: the hub put it there at submission) against the hub keys this
   node trusts (the pinned one, and the next one a key rotation announced). A bad signature ends the step here.
2. fetch: into `<dir>/.downloads/<sha256>.part`, from the manifest's `url` first (a mirror) and then the hub
   (`GET /artifacts/{sha256}`, signed by this node's key), each attempt resuming the `.part` with a Range request.
3. check: the SHA-256 and size of the whole download against the manifest. A mismatch deletes the `.part` and
   tries the next source; when none is left the step fails, with nothing installed.
4. stage: the file (or the unpacked tar archive) under `<dir>/<name>/.staging-*`, renamed to `<dir>/<name>/<version>`
   (the signed manifest kept inside as `.manifest.cose`).
5. switch: `<dir>/<name>/previous` -> the version `current` named, then `current` -> the new version, each link
   replaced with os.replace of a new one (atomic); versions other than current and previous are removed.

The phases run in this order on disk (blocking file and network I/O in worker threads); `Slots` is the on-disk
state of one artifact, tested on its own (tests/unit/test_artifacts.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import http.client
import os
import shutil
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nacl.signing

from protocols import ProtocolError
from protocols.manifest import (ARTIFACT_NAME, SEMVER, FetchRequest, Manifest, open_manifest, peek_manifest,
                                seal_fetch)

from .executors import Executor, Output, StepContext, StepFailed
from .runtime.storage import sync_dir

INSTALL: Final = "artifact.install"
ROLLBACK: Final = "artifact.rollback"
CHUNK: Final = 64 * 1024
MANIFEST_FILE: Final = ".manifest.cose"
NODE_SCHEME: Final = "FleetflowNode"  # the hub's name for a request signed by a node (hub/artifacts/api.py)


@dataclass(frozen=True)
class ArtifactSettings:
    """What the artifact executors need from the agent: where, from which hub, and with which keys."""

    root: Path
    fleet: str
    node_id: str
    node_key: nacl.signing.SigningKey
    hub_keys: Callable[[], tuple[bytes, ...]]  # the hub keys the node trusts at the moment (they follow rotations)
    hub_url: str | None = None
    ca_file: str | None = None
    max_bytes: int = 1 << 30
    read_timeout: float = 30.0   # seconds without a byte before an attempt is given up (and resumed)
    backoff: tuple[float, float] = (0.5, 10.0)  # first and longest pause between download attempts


# -- on-disk state of one artifact ---------------------------------------------------------------------------------

class Slots:
    """`<root>/<name>/`: one directory per installed version, the `current` and `previous` links. Every change is a
    rename or a link replaced atomically, so a crash at any point leaves `current` at the old or the new version."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = Path(root) / name
        self.current_link, self.previous_link = self.dir / "current", self.dir / "previous"

    def _target(self, link: Path) -> str | None:
        try:
            version = os.readlink(link)
        except (FileNotFoundError, OSError):
            return None
        return version if SEMVER.match(version) and (self.dir / version).is_dir() else None

    def current(self) -> str | None:
        return self._target(self.current_link)

    def previous(self) -> str | None:
        return self._target(self.previous_link)

    def installed(self, version: str, sha256: str) -> bool:
        """`version` is staged with the bytes of this SHA-256 (the manifest kept beside them says so)."""
        try:
            kept = (self.dir / version / MANIFEST_FILE).read_bytes()
        except OSError:
            return False
        return _manifest_sha(kept) == sha256

    def stage(self, version: str, signed_manifest: bytes, place: Callable[[Path], None]) -> None:
        """Make `<version>/` from a staging directory that `place(directory)` fills; replaces a `<version>/` of other
        bytes (never the one `current` or `previous` names: the caller checks `installed` first)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = self.dir / f".staging-{version}-{os.urandom(4).hex()}"
        staging.mkdir()
        try:
            place(staging)
            (staging / MANIFEST_FILE).write_bytes(signed_manifest)
            for path in (staging / MANIFEST_FILE, staging):
                sync_dir(path)  # an fsync of what it names: the manifest file, then the directory's entries
            final = self.dir / version
            if final.exists():
                if version in (self.current(), self.previous()):
                    raise StepFailed(f"{INSTALL}: {self.dir.name}@{version} is installed with other bytes; a version "
                                     f"never changes, so nothing was switched")
                shutil.rmtree(final)
            os.rename(staging, final)
            sync_dir(self.dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _point(self, link: Path, version: str) -> None:
        tmp = self.dir / f".{link.name}-{os.urandom(4).hex()}"
        os.symlink(version, tmp)
        os.replace(tmp, link)
        sync_dir(self.dir)

    def switch(self, version: str) -> str | None:
        """`current` -> `version`, the version it named kept as `previous`; returns that version (None: first)."""
        before = self.current()
        if before == version:
            return before
        if before is not None:
            self._point(self.previous_link, before)
        self._point(self.current_link, version)
        self.prune()
        return before

    def rollback(self) -> tuple[str | None, str]:
        """`current` -> `previous`, and `previous` removed (a second rollback has nowhere to go). (before, after)."""
        before, after = self.current(), self.previous()
        if after is None:
            raise StepFailed(f"{ROLLBACK}: {self.dir.name} has no previous version to go back to "
                             f"(current: {before or 'none'})")
        self._point(self.current_link, after)
        self.previous_link.unlink()
        sync_dir(self.dir)
        return before, after

    def prune(self) -> None:
        """Remove every version but current and previous, and what an interrupted staging left."""
        keep = {self.current(), self.previous()}
        for entry in self.dir.iterdir():
            if entry.name.startswith(".staging-") or (entry.is_dir() and not entry.is_symlink()
                                                       and SEMVER.match(entry.name) and entry.name not in keep):
                shutil.rmtree(entry, ignore_errors=True)


def _manifest_sha(signed: bytes) -> str | None:
    try:
        return peek_manifest(signed)[0].sha256
    except ProtocolError:
        return None


# -- downloading ---------------------------------------------------------------------------------------------------

class _Retry(Exception):
    """This attempt failed in a way the same source may not fail again (a dropped connection, a 5xx)."""


class _SourceFailed(Exception):
    """This source cannot give the bytes (refused, not found, wrong bytes): try the next one."""


@dataclass(frozen=True)
class Source:
    url: str
    label: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Download:
    """A resumable download of the bytes a manifest names into `part`, hashed as they arrive; blocking (it runs in
    a worker thread and stops at the next chunk once `stop` is set)."""

    manifest: Manifest
    part: Path
    stop: threading.Event
    read_timeout: float
    context: ssl.SSLContext | None = None
    resumed_at: list[int] = field(default_factory=list)
    _digest: Any = None

    def have(self) -> int:
        """Bytes already in the `.part` file (hashed once, then followed as they are appended)."""
        if self._digest is None:
            self._digest = hashlib.sha256()
            with contextlib.suppress(FileNotFoundError), open(self.part, "rb") as f:
                while chunk := f.read(1 << 20):
                    self._digest.update(chunk)
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def restart(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.part.unlink()
        self._digest = hashlib.sha256()

    def complete(self) -> bool:
        return self.have() == self.manifest.size

    def sha256(self) -> str:
        self.have()
        return str(self._digest.hexdigest())

    def attempt(self, source: Source) -> None:
        """One request; returns with the whole size in `.part`, or raises `_Retry` / `_SourceFailed`."""
        have = self.have()
        if have > self.manifest.size:
            self.restart()
            have = 0
        headers = dict(source.headers)
        if have:
            headers["Range"] = f"bytes={have}-"
        request = urllib.request.Request(source.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.read_timeout,
                                              context=self.context if source.url.startswith("https:") else None)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:  # the range is past what the server holds: our `.part` is not a prefix of it
                self.restart()
                raise _Retry(f"HTTP 416 for a range from {have}") from None
            if exc.code >= 500 or exc.code == 429:
                raise _Retry(f"HTTP {exc.code}") from None
            hint = " (is this node accepted by the hub?)" if exc.code in (401, 403) else ""
            raise _SourceFailed(f"{source.label} answered HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _Retry(str(getattr(exc, "reason", exc))) from None
        with response:
            if response.status == 206:
                start = _range_start(response.headers.get("Content-Range", ""))
                if start != have:
                    self.restart()
                    raise _Retry(f"the server resumed at byte {start}, not {have}")
                self.resumed_at.append(have)
            elif have:
                self.restart()  # the server ignored the Range: it sends everything again
            self._receive(response, source)

    def _receive(self, response: Any, source: Source) -> None:
        with open(self.part, "ab") as out:
            try:
                while not self.stop.is_set():
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    if out.tell() + len(chunk) > self.manifest.size:
                        out.close()
                        self.restart()
                        raise _SourceFailed(f"{source.label} sent more than the manifest's {self.manifest.size} bytes")
                    out.write(chunk)
                    self._digest.update(chunk)
            except (http.client.HTTPException, OSError) as exc:  # the connection dropped: keep what arrived
                out.flush()
                os.fsync(out.fileno())
                raise _Retry(f"connection lost after {out.tell()} bytes ({type(exc).__name__})") from None
            out.flush()
            os.fsync(out.fileno())
        if self.stop.is_set():
            raise _Retry("stopped")
        if not self.complete():
            raise _Retry(f"the response ended after {self.have()} of {self.manifest.size} bytes")


def _range_start(content_range: str) -> int | None:
    unit, _, rest = content_range.partition(" ")
    start = rest.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def sources(settings: ArtifactSettings, manifest: Manifest) -> list[Source]:
    """Where the bytes may come from, in order: the manifest's mirror, then the hub (with a request signed by this
    node, which only the hub is shown)."""
    out = [Source(manifest.url, f"the mirror {manifest.url}")] if manifest.url else []
    if settings.hub_url:
        proof = seal_fetch(FetchRequest(settings.fleet, settings.node_id, manifest.sha256), settings.node_key)
        out.append(Source(f"{settings.hub_url}/artifacts/{manifest.sha256}", f"the hub {settings.hub_url}",
                          {"Authorization": f"{NODE_SCHEME} {proof.hex()}"}))
    return out


def fetch(settings: ArtifactSettings, manifest: Manifest, stop: threading.Event, attempts: int) -> Download:
    """Download and check the bytes; returns the finished `Download` (its `.part` holds exactly them), or raises
    StepFailed with the last problem. Blocking."""
    downloads = settings.root / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    context = ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else None
    download = Download(manifest, downloads / f"{manifest.sha256}.part", stop, settings.read_timeout, context)
    pending = sources(settings, manifest)
    if not pending:
        raise StepFailed(f"{INSTALL}: {manifest.ref}: nowhere to fetch it from: the manifest has no url and this "
                         f"agent has no artifacts_hub_url")
    problem, pause = "", settings.backoff[0]
    for number in range(attempts):
        if not pending or stop.is_set():
            break
        source = pending[0]
        try:
            if not download.complete():
                download.attempt(source)
            actual = download.sha256()
            if actual == manifest.sha256:
                return download
            download.restart()
            raise _SourceFailed(f"the bytes from {source.label} have sha256 {actual}, the manifest says "
                                f"{manifest.sha256}")
        except _SourceFailed as exc:
            problem = str(exc)
            pending.pop(0)
        except _Retry as exc:
            problem = f"{source.label}: {exc}"
            if number + 1 < attempts:
                stop.wait(pause)  # interruptible: a cancelled step does not wait out its backoff
                pause = min(settings.backoff[1], pause * 2)
    raise StepFailed(f"{INSTALL}: {manifest.ref}: {problem or 'download stopped'}; nothing was installed or switched")


# -- the executors -------------------------------------------------------------------------------------------------

def _int(inputs: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = inputs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StepFailed(f"{INSTALL}: with.{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _flag(inputs: dict[str, Any], name: str, executor: str) -> bool:
    value = inputs.get(name, False)
    if not isinstance(value, bool):
        raise StepFailed(f"{executor}: with.{name} must be true or false, got {value!r}")
    return value


def verified_manifest(inputs: dict[str, Any], settings: ArtifactSettings) -> tuple[Manifest, bytes]:
    """The manifest of `with.manifest`, checked against the hub keys this node trusts, and its signed bytes."""
    raw = inputs.get("manifest")
    try:
        signed = bytes.fromhex(raw) if isinstance(raw, str) else b""
    except ValueError:
        signed = b""
    if not signed:
        raise StepFailed(f"{INSTALL}: with.manifest must be the signed manifest in hex (the hub adds it for "
                         f"with.artifact: NAME@VERSION)")
    try:
        manifest = open_manifest(signed, settings.hub_keys())
    except ProtocolError as exc:
        raise StepFailed(f"{INSTALL}: manifest refused: {exc}; nothing was installed or switched") from None
    ref = inputs.get("artifact")
    if ref is not None and ref != manifest.ref:
        raise StepFailed(f"{INSTALL}: with.artifact names {ref!r} but the signed manifest is {manifest.ref}; "
                         f"nothing was installed or switched")
    return manifest, signed


def _place(download: Download, manifest: Manifest, unpack: bool, executable: bool) -> Callable[[Path], None]:
    def place(staging: Path) -> None:
        if unpack:
            import tarfile  # here, not at the top: 0.4 MB an idle agent does not need

            try:
                with tarfile.open(download.part) as archive:
                    # The "data" filter refuses absolute paths, links leading out, devices, setuid bits.
                    archive.extractall(staging, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise StepFailed(f"{INSTALL}: {manifest.ref}: cannot unpack it as a tar archive: {exc}") from None
            download.part.unlink()
        else:
            target = staging / manifest.file
            os.replace(download.part, target)  # same file system: the verified bytes move, nothing is copied
            os.chmod(target, 0o755 if executable else 0o644)

    return place


def make_artifact_executors(settings: ArtifactSettings) -> dict[str, Executor]:
    # One change at a time per artifact: two runs installing one name must not interleave their link switches.
    locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def install(inputs: dict[str, Any], ctx: StepContext) -> Output:
        manifest, signed = verified_manifest(inputs, settings)
        unpack, executable = _flag(inputs, "unpack", INSTALL), _flag(inputs, "executable", INSTALL)
        attempts = _int(inputs, "attempts", 6, 1, 100)
        if manifest.size > settings.max_bytes:
            raise StepFailed(f"{INSTALL}: {manifest.ref} has {manifest.size} bytes, over this agent's "
                             f"artifacts_max_bytes ({settings.max_bytes}); nothing was installed or switched")
        slots = Slots(settings.root, manifest.name)
        stop = threading.Event()
        async with locks[manifest.name]:
            resumed: list[int] = []
            source = "installed already"
            try:
                if not slots.installed(manifest.version, manifest.sha256):
                    download = await asyncio.to_thread(fetch, settings, manifest, stop, attempts)
                    resumed, source = download.resumed_at, "downloaded"
                    await asyncio.to_thread(slots.stage, manifest.version, signed,
                                            _place(download, manifest, unpack, executable))
                before = await asyncio.to_thread(slots.switch, manifest.version)
            except asyncio.CancelledError:
                stop.set()  # the download thread ends at its next chunk; the `.part` stays for the next attempt
                raise
        return {"artifact": manifest.name, "version_before": before, "version": manifest.version,
                "sha256": manifest.sha256, "size": manifest.size, "path": str(slots.current_link),
                "source": source, "resumed_at": resumed}

    async def rollback(inputs: dict[str, Any], ctx: StepContext) -> Output:
        ref = inputs.get("artifact")
        name, _, version = ref.partition("@") if isinstance(ref, str) else ("", "", "")
        if not ARTIFACT_NAME.match(name) or (version and not SEMVER.match(version)):
            raise StepFailed(f"{ROLLBACK}: with.artifact must be NAME or NAME@VERSION (the version rolled back "
                             f"from), got {ref!r}")
        slots = Slots(settings.root, name)
        async with locks[name]:
            current = slots.current()
            if version and current != version:
                # Rolled back already (a retried compensation), or never switched: nothing to undo.
                return {"artifact": name, "version_before": current, "version": current, "changed": False}
            before, after = await asyncio.to_thread(slots.rollback)
        return {"artifact": name, "version_before": before, "version": after, "changed": True}

    return {INSTALL: install, ROLLBACK: rollback}
