"""The dashboard's routes: its pages and files at /ui, the data its pages load, the live stream at /events.

Each route that reads or changes anything is a row of hub/api.py `ROUTES`, with its role, behind the same check as
every other route (a browser's session cookie stands for its token: hub/ui/session.py). Public, and holding nothing
but what the package ships: the page shell `GET /ui` and the files under /ui/static (`PUBLIC`); the shell asks for
a login when the API answers 401.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from agent.runtime.timeouts import within

from .. import __version__
from .feed import LiveFeed, Subscriber, sse
from .session import COOKIE, DashboardMiddleware, Sessions
from .views import attempts_on, fleet_row, fleet_snapshot, run_graph

if TYPE_CHECKING:
    from ..api import Access
    from ..service import Hub

STATIC: Final = Path(__file__).parent / "static"
PUBLIC: Final = ("/ui", "/ui/static")  # the shell page, and the mount of the files it loads
KEEPALIVE_S: Final = 15.0  # a comment line this often keeps proxies from closing a quiet stream; the token is checked
NOT_A_STREAM: Final = "GET /events is a Server-Sent Events stream: ask for it with Accept: text/event-stream"


def resume_point(last_event_id: str | None, after: int | None) -> int | None:
    """Where a consumer resumes: the browser's Last-Event-ID (on a reconnection), else `?after=` (a first
    connection after loading a snapshot), else None (live updates only). An id that is not one of ours (not a
    whole number) resumes from nowhere, which the feed answers with `reload`."""
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        return int(text) if text.isdigit() else -1
    return after


async def _stream(feed: LiveFeed, subscriber: Subscriber, head: bytes,
                  allowed: Callable[[], bool]) -> AsyncIterator[bytes]:
    try:
        yield head
        while True:
            try:
                batch = await within(KEEPALIVE_S, subscriber.queue.get())
            except TimeoutError:
                if not allowed():
                    subscriber.end("the token of this stream is no longer valid; log in again")
                    continue
                yield b": keepalive\n\n"
                continue
            if batch is None:
                break
            yield batch
        if subscriber.reload is not None:
            yield sse("reload", {"reason": subscriber.reload})
    finally:
        feed.unsubscribe(subscriber)


def install_dashboard(app: FastAPI, hub: Hub, access: Access, handles: Callable[[str, str], Callable[..., Any]]
                      ) -> None:
    """Mount the shell and its files, add the session middleware, and bind the handlers of the dashboard's rows of
    hub/api.py `ROUTES` (create_app guards each)."""
    from ..api import SafeJSONResponse, encoded_off_loop, node_view

    sessions = Sessions()
    app.add_middleware(DashboardMiddleware, sessions=sessions)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    async def shell(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.add_route("/ui", shell, methods=["GET"], include_in_schema=False)

    @handles("POST", "/ui/login")
    async def login(request: Request) -> Response:
        """The token came as a bearer token and passed the role check: a session for it, as an HttpOnly cookie."""
        token = request.headers["authorization"].partition(" ")[2].strip()
        caller = request.state.caller
        async with access.audited(request, caller.name):
            session_id, session = sessions.open(token, asyncio.get_running_loop().time())
        response = SafeJSONResponse({"name": caller.name, "role": caller.role, "csrf": session.csrf})
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @handles("POST", "/ui/logout")
    async def logout(request: Request) -> Response:
        async with access.audited(request, request.state.caller.name):
            held = getattr(request.state, "ui_session", None)
            if held is not None:
                sessions.close(held[0])
        response = SafeJSONResponse({"logged_out": held is not None})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @handles("GET", "/ui/session")
    async def whoami(request: Request) -> dict[str, Any]:
        held = getattr(request.state, "ui_session", None)
        caller = request.state.caller
        return {"name": caller.name, "role": caller.role, "csrf": held[1].csrf if held is not None else None,
                "fleet": hub.config.fleet, "version": __version__}

    @handles("GET", "/ui/fleet")
    async def fleet() -> Response:
        return await encoded_off_loop(fleet_snapshot(hub))  # the rows read on the loop: one consistent state

    @handles("GET", "/ui/nodes/{node_id}")
    async def node_page(node_id: str) -> Response:
        if node_id not in hub.core.nodes and hub.registry.get(node_id) is None:
            raise HTTPException(404, f"no node {node_id!r}")
        now = hub.clock()
        return SafeJSONResponse({"seq": hub.core.seq, "now": now, "node": node_view(hub, node_id),
                                 "row": fleet_row(hub.core, hub.views, node_id),
                                 "attempts": attempts_on(hub.core, node_id),
                                 "telemetry": hub.feed.telemetry.series(node_id, now)})

    @handles("GET", "/ui/runs/{run_id}")
    async def run_page(run_id: str) -> Response:
        from ..api import archived_summary

        run = hub.core.runs.get(run_id)
        if run is not None:
            return SafeJSONResponse({"seq": hub.core.seq, "now": hub.clock(),
                                     "run": run_graph(hub.core, run, hub.clock())})
        if run_id in hub.core.archived:
            return SafeJSONResponse({"seq": hub.core.seq, "now": hub.clock(),
                                     "run": archived_summary(hub.core, run_id)})
        raise HTTPException(404, f"no run {run_id!r}")

    @handles("GET", "/events")
    async def events(request: Request,
                     after: int | None = Query(None, ge=0, description="resume after this journal sequence (a "
                                                                      "snapshot's seq); Last-Event-ID wins"),
                     last_event_id: str | None = Header(None)) -> Response:
        if "text/event-stream" not in request.headers.get("accept", ""):
            raise HTTPException(406, NOT_A_STREAM)
        given = request.headers.get("authorization", "").partition(" ")[2].strip()
        subscriber, head = hub.feed.subscribe(resume_point(last_event_id, after))
        return StreamingResponse(
            _stream(hub.feed, subscriber, head, lambda: access.tokens.identify(given) is not None),
            media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})  # nginx: do not buffer the stream
