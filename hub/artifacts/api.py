"""The artifact routes of the hub's API (their roles are rows of hub/api.py `ROUTES`), and how a node is let in.

Nodes hold no API token. A node fetches a blob with `Authorization: FleetflowNode <hex>`, a fetch request signed by
its own key (protocols/manifest.py): the hub lets it in when the node is accepted in its registry, the request names
this fleet and the very blob of the URL, and the signature verifies with the node's enrolled key. The bytes are
verified by the node anyway (SHA-256 and the hub-signed manifest), so this guards what they may be worth to others
(firmware, a customer's configuration): only the fleet's accepted nodes, and token holders, download them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from fastapi import HTTPException, Query, Request
from fastapi.responses import FileResponse
from starlette.types import Scope

from protocols import ProtocolError
from protocols.manifest import peek_fetch, verify_fetch

from ..tokens import VIEWER, Caller
from .store import CHUNK, ArtifactTooLarge, check_new

if TYPE_CHECKING:
    from ..api import Access
    from ..service import Hub

NODE_SCHEME: Final = "FleetflowNode"
UPLOAD: Final = ("POST", "/artifacts")


def is_upload(scope: Scope) -> bool:
    """An artifact upload is bounded by the store's own limit, not the API's request body limit."""
    return (scope.get("method"), scope.get("path")) == UPLOAD


def node_caller(hub: Hub, request: Request, credentials: str) -> Caller | None:
    """The node a signed fetch request comes from, or None when it does not prove one that may fetch this blob."""
    try:
        fetch, parsed = peek_fetch(bytes.fromhex(credentials))
    except (ValueError, ProtocolError):
        return None
    if fetch.fleet != hub.config.fleet or fetch.sha256 != request.path_params.get("sha256"):
        return None
    enrolled = hub.registry.get(fetch.node)
    if enrolled is None or enrolled["state"] != "accepted":
        return None
    try:
        verify_fetch(parsed, bytes.fromhex(enrolled["key"]))
    except ProtocolError:
        return None
    return Caller(f"node:{fetch.node}", VIEWER)  # token names cannot hold a colon: never mistaken for a token


def install_routes(hub: Hub, access: Access, handles: Callable[[str, str], Callable[..., Any]]) -> None:
    """Bind the artifact handlers (hub/api.py `create_app` guards each by its `ROUTES` row)."""
    access.node_auth = lambda request, credentials: node_caller(hub, request, credentials)

    @handles("GET", "/artifacts")
    async def list_artifacts() -> list[dict[str, Any]]:
        return [stored.view() for stored in await asyncio.to_thread(hub.artifacts.list)]

    @handles("POST", "/artifacts")
    async def add_artifact(request: Request,
                           name: str = Query(description="1-64 of A-Z a-z 0-9 _ . -, not starting with a dot"),
                           version: str = Query(description="semantic version, MAJOR.MINOR.PATCH"),
                           file: str = Query(description="the file name nodes install it as"),
                           url: str | None = Query(None, description="a mirror serving the same bytes")
                           ) -> dict[str, Any]:
        """The body is the artifact's bytes (application/octet-stream), streamed to disk and hashed as it arrives."""
        async with access.audited(request, f"{name}@{version}", file=file, url=url) as note:
            store = hub.artifacts
            check_new(name, version, file, url)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > store.max_bytes:
                raise ArtifactTooLarge(f"artifact: {declared} bytes, over the store's limit of {store.max_bytes}")
            upload = await asyncio.to_thread(store.begin)
            try:
                pending = bytearray()
                async for chunk in request.stream():
                    pending += chunk
                    if len(pending) >= CHUNK:  # disk writes and hashing off the loop, a megabyte at a time
                        await asyncio.to_thread(upload.write, bytes(pending))
                        pending.clear()
                await asyncio.to_thread(upload.write, bytes(pending))
            except BaseException:
                upload.discard()
                raise
            stored, created = await asyncio.to_thread(store.commit, upload, name, version, file, url, hub.clock())
            note.params.update(sha256=stored.manifest.sha256, size=stored.manifest.size, created=created)
        return {**stored.view(), "created": created}

    @handles("GET", "/artifacts/{sha256}")
    async def blob(sha256: str) -> FileResponse:
        """The bytes, with HTTP Range (a node resumes an interrupted download from where it stopped)."""
        path = hub.artifacts.blob(sha256)
        if path is None:
            raise HTTPException(404, f"no artifact blob {sha256[:64]!r} on this hub")
        return FileResponse(path, media_type="application/octet-stream")
