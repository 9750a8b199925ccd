"""The hub's artifact store: content-addressed blobs and the manifests the hub signed for them, in its data directory.

    DATA/artifacts/blobs/<sha256>                  the bytes, named by their SHA-256 (one copy however often added)
    DATA/artifacts/manifests/<name>/<version>.cose the signed manifest (protocols/manifest.py), written once
    DATA/artifacts/incoming/                       uploads being received (emptied when the store opens)

A version is immutable: adding `name@version` again with the same bytes answers the manifest already stored, with
other bytes it is refused (409). Every file appears by an atomic rename (blobs) or link (manifests, so two uploads
of one version at once cannot both win), fsync'd. The store holds no state in memory: the API, the CLI's uploads
and run submission each read the files, so nothing goes stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nacl.signing

from agent.runtime.storage import sync_dir, write_private
from protocols import BadSignature, Malformed, ProtocolError, kid_for
from protocols.manifest import (SHA256_HEX, Manifest, artifact_problem, open_manifest, peek_manifest, seal_manifest,
                                url_problem)

from ..errors import Conflict, NotFound, Unprocessable

DEFAULT_MAX_BYTES: Final = 4 << 30  # one upload; the agent has its own bound (artifacts_max_bytes)
CHUNK: Final = 1 << 20


class ArtifactError(Unprocessable):
    """An artifact request that cannot be done (422 unless a subclass says otherwise); the message names the field."""


class ArtifactNotFound(ArtifactError):
    status = NotFound.status


class ArtifactConflict(ArtifactError):
    status = Conflict.status


class ArtifactTooLarge(ArtifactError):
    status = 413


@dataclass(frozen=True, slots=True)
class Stored:
    """A manifest as the store holds it: the signed bytes, and what they say."""

    manifest: Manifest
    signed: bytes
    kid: bytes

    def view(self) -> dict[str, Any]:
        """What `artifacts list --json` and the API show: the fields, the signing key, the signed manifest in hex."""
        return {"ref": self.manifest.ref, **self.manifest.to_map(), "url": self.manifest.url, "kid": self.kid.hex(),
                "manifest": self.signed.hex()}


class Upload:
    """Bytes being received into `incoming/`, hashed as they arrive, bounded by `limit`. Blocking file I/O: the API
    hands it whole megabytes in a worker thread."""

    def __init__(self, incoming: Path, limit: int) -> None:
        self.path = incoming / f"upload-{secrets.token_hex(8)}"
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            raise ArtifactTooLarge(f"artifact: more than {self.limit} bytes, the store's limit for one artifact")
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._hash.update(data)
        self.size += len(data)

    def finish(self) -> str:
        """Make the bytes durable; their SHA-256 in hex."""
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        return self._hash.hexdigest()

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def parse_ref(ref: Any, where: str) -> tuple[str, str]:
    """`NAME@VERSION` -> (name, version); ArtifactError naming `where` otherwise."""
    if not isinstance(ref, str) or ref.count("@") != 1:
        raise ArtifactError(f"{where}: expected NAME@VERSION, got {str(ref)[:80]!r}")
    name, version = ref.split("@")
    problem = artifact_problem(name, version)
    if problem is not None:
        raise ArtifactError(f"{where}: {problem}")
    return name, version


def check_new(name: str, version: str, file: str | None, url: str | None) -> None:
    """Refuse a bad name, version, file name or URL before any byte of an upload is read."""
    problem = artifact_problem(name, version) or (url_problem(url) if url is not None else None)
    if problem is None and file is not None:
        try:
            Manifest(name, version, "0" * 64, 0, file, 0)
        except ProtocolError as exc:
            problem = str(exc).removeprefix("manifest: ")
    if problem is not None:
        raise ArtifactError(f"artifact: {problem}")


class ArtifactStore:
    def __init__(self, root: Path, signing_key: Callable[[], nacl.signing.SigningKey],
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.signing_key = signing_key  # the key the hub signs with now (it changes when a key rotation switches)
        self.max_bytes = max_bytes
        self.blobs, self.manifests, self.incoming = (self.root / n for n in ("blobs", "manifests", "incoming"))
        for directory in (self.blobs, self.manifests, self.incoming):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.incoming.iterdir():  # an upload a crash interrupted
            leftover.unlink()

    # -- adding ----------------------------------------------------------------------------------------------------

    def begin(self) -> Upload:
        return Upload(self.incoming, self.max_bytes)

    def commit(self, upload: Upload, name: str, version: str, file: str, url: str | None,
               now: int) -> tuple[Stored, bool]:
        """Store the upload's bytes and sign their manifest; (stored, created). Blocking: call it in a thread."""
        try:
            sha256 = upload.finish()
            existing = self._read(name, version)
            if existing is not None:
                return self._same_or_refuse(existing, sha256), False
            blob = self.blobs / sha256
            if blob.exists():
                upload.path.unlink()  # the same bytes are stored already (content-addressed)
            else:
                os.chmod(upload.path, 0o644)
                os.replace(upload.path, blob)
                sync_dir(self.blobs)
            manifest = Manifest(name, version, sha256, upload.size, file, now, url)
            signed = seal_manifest(manifest, self.signing_key())
            if not self._create(name, version, signed):  # another upload of this version won the race
                other = self._read(name, version)
                assert other is not None
                return self._same_or_refuse(other, sha256), False
            return Stored(manifest, signed, kid_for(bytes(self.signing_key().verify_key))), True
        finally:
            upload.discard()

    def add_file(self, path: Path, name: str, version: str, url: str | None, now: int,
                 file: str | None = None) -> tuple[Stored, bool]:
        """Add a local file (tests, and a hub operator's scripts); the API streams uploads through `begin`."""
        check_new(name, version, file or path.name, url)
        upload = self.begin()
        try:
            with open(path, "rb") as source:
                while chunk := source.read(CHUNK):
                    upload.write(chunk)
        except BaseException:
            upload.discard()
            raise
        return self.commit(upload, name, version, file or path.name, url, now)

    def _same_or_refuse(self, existing: Stored, sha256: str) -> Stored:
        if existing.manifest.sha256 != sha256:
            raise ArtifactConflict(f"artifact {existing.manifest.ref} exists with other bytes (sha256 "
                                   f"{existing.manifest.sha256}); a version never changes: add a new version")
        return existing

    def _path(self, name: str, version: str) -> Path:
        return self.manifests / name / f"{version}.cose"

    def _create(self, name: str, version: str, signed: bytes) -> bool:
        """Write a manifest unless one exists (a link never replaces its target): True if this one was written."""
        directory = self.manifests / name
        directory.mkdir(exist_ok=True, mode=0o700)
        tmp = self.incoming / f"manifest-{secrets.token_hex(8)}"
        tmp.write_bytes(signed)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, self._path(name, version))
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        sync_dir(directory)
        return True

    # -- reading ---------------------------------------------------------------------------------------------------

    def _read(self, name: str, version: str) -> Stored | None:
        try:
            signed = self._path(name, version).read_bytes()
        except FileNotFoundError:
            return None
        try:
            manifest, kid = peek_manifest(signed)
        except ProtocolError as exc:
            raise ArtifactError(f"artifact {name}@{version}: the stored manifest is unreadable ({exc})") from None
        return Stored(manifest, signed, kid)

    def get(self, name: str, version: str) -> Stored:
        stored = self._read(name, version)
        if stored is None:
            known = sorted(p.stem for p in (self.manifests / name).glob("*.cose")) if artifact_problem(
                name, version) is None else []
            hint = f" (known versions: {', '.join(known)})" if known else " (fleetflow artifacts list)"
            raise ArtifactNotFound(f"no artifact {name}@{version}{hint}")
        return stored

    def list(self) -> list[Stored]:
        out = []
        for path in sorted(self.manifests.glob("*/*.cose")):
            stored = self._read(path.parent.name, path.stem)
            if stored is not None:
                out.append(stored)
        return sorted(out, key=lambda s: (s.manifest.name, s.manifest.created, s.manifest.version))

    def blob(self, sha256: str) -> Path | None:
        """The file holding these bytes, or None (also for anything that is not a SHA-256 in hex)."""
        if not SHA256_HEX.match(sha256):
            return None
        path = self.blobs / sha256
        return path if path.is_file() else None

    # -- for runs --------------------------------------------------------------------------------------------------

    def for_run(self, name: str, version: str) -> bytes:
        """The signed manifest a run carries, checked with the key the hub signs with now. One signed before a key
        rotation is signed again with the current key, after the blob is hashed anew (the old key is gone, so the
        hub vouches only for bytes it checked itself). Blocking: call it in a thread."""
        stored = self.get(name, version)
        key = self.signing_key()
        public = bytes(key.verify_key)
        if stored.kid == kid_for(public):
            try:
                open_manifest(stored.signed, [public])
            except (BadSignature, Malformed) as exc:
                raise ArtifactError(f"artifact {name}@{version}: its stored manifest does not verify with the hub key "
                                    f"({exc}); it was changed on disk: remove {self._path(name, version)} and add "
                                    f"the artifact again") from None
            return stored.signed
        manifest = stored.manifest
        blob = self.blob(manifest.sha256)
        if blob is None or _sha256_of(blob) != (manifest.sha256, manifest.size):
            raise ArtifactError(f"artifact {name}@{version}: its blob is missing or changed (sha256 "
                                f"{manifest.sha256}); add the artifact again")
        signed = seal_manifest(manifest, key)
        write_private(self._path(name, version), signed)  # atomic and fsync'd
        return signed


def _sha256_of(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


