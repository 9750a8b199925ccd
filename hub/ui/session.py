"""Browser sessions for the dashboard, and the headers every answer of the hub carries.

A browser logs in once with an API token (`POST /ui/login`, the token in the Authorization header, as every API
client sends it); the hub answers with a session cookie (HttpOnly: page scripts cannot read it; SameSite=Strict:
no other site's page makes the browser send it; Secure when the hub serves TLS) and a CSRF token for the page.
The session is held in memory only: the cookie carries a random id, never the API token, and a restarted hub asks
for a new login.

`DashboardMiddleware` turns a request that carries a live session cookie and no Authorization header into one with
the session's token as its bearer token, so every route keeps its one role check (hub/api.py `ROUTES`), and a
revoked token stops its sessions at their next request. A cookie is the one credential a browser attaches by
itself, so a request it authenticates that is not a read (GET, HEAD) must also carry the session's CSRF token in
`X-CSRF-Token`, which only the hub's own pages can read (`GET /ui/session`); requests with an Authorization header
are left as they are (no other site can make a browser send one). Every answer gets a Content-Security-Policy
without inline scripts or styles, `nosniff`, no referrer, no framing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("fleetflow.hub.ui")

COOKIE: Final = "fleetflow_session"
CSRF_HEADER: Final = "x-csrf-token"
IDLE_S: Final = 8 * 3600         # a session unused this long ends
LIFETIME_S: Final = 24 * 3600    # and none lasts longer than this
MAX_SESSIONS: Final = 1000       # beyond, the least recently used one ends
READS: Final = frozenset({"GET", "HEAD"})
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
              "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS: Final = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"))
CSRF_REFUSED: Final = ("missing or wrong X-CSRF-Token: a request authenticated by the dashboard's session cookie "
                       "that changes something must carry the token GET /ui/session gives")


@dataclass(slots=True)
class Session:
    token: str      # the API token it stands for, checked again at every request
    csrf: str
    opened: float
    used: float


def _key(session_id: str) -> str:
    # Looked up by a hash of the id: the dictionary's comparisons leak nothing about live ids.
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """The live sessions by (hashed) id, with idle and total lifetimes; the time is passed in."""

    def __init__(self, idle: float = IDLE_S, lifetime: float = LIFETIME_S, limit: int = MAX_SESSIONS) -> None:
        self.idle, self.lifetime, self.limit = idle, lifetime, limit
        self._live: dict[str, Session] = {}

    def open(self, token: str, now: float) -> tuple[str, Session]:
        """A new session for `token`: its id (for the cookie) and the session (its CSRF token)."""
        self._expire(now)
        while len(self._live) >= self.limit:
            oldest = min(self._live, key=lambda k: self._live[k].used)
            del self._live[oldest]
        session_id = secrets.token_urlsafe(32)
        session = self._live[_key(session_id)] = Session(token, secrets.token_urlsafe(32), now, now)
        return session_id, session

    def find(self, session_id: str, now: float) -> Session | None:
        key = _key(session_id)
        session = self._live.get(key)
        if session is None:
            return None
        if now - session.used > self.idle or now - session.opened > self.lifetime:
            del self._live[key]
            return None
        session.used = now
        return session

    def close(self, session_id: str) -> None:
        self._live.pop(_key(session_id), None)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._live.items() if now - s.used > self.idle or now - s.opened > self.lifetime]:
            del self._live[key]

    def __len__(self) -> int:
        return len(self._live)


def session_cookie(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            found = cookie_parser(value.decode("latin-1")).get(COOKIE)
            if found:
                return found
    return None


class DashboardMiddleware:
    """ASGI middleware: session cookie -> bearer token (with the CSRF check), and the security headers."""

    def __init__(self, app: ASGIApp, sessions: Sessions, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.sessions, self.clock = app, sessions, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                extra = [h for h in SECURITY_HEADERS if h[0] not in present]
                if b"cache-control" not in present and not scope["path"].startswith("/ui/static/"):
                    extra.append((b"cache-control", b"no-store"))  # answers hold fleet data or a CSRF token
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        headers = scope.get("headers", [])
        session_id = None if any(name == b"authorization" for name, _ in headers) else session_cookie(scope)
        session = self.sessions.find(session_id, self.clock()) if session_id else None
        if session_id and session is not None:
            if scope["method"] not in READS:
                given = next((v for name, v in headers if name == CSRF_HEADER.encode()), b"")
                if not hmac.compare_digest(given, session.csrf.encode()):
                    log.warning("dashboard: refused %s %s from %s: no valid CSRF token", scope["method"],
                                scope["path"][:120], (scope.get("client") or ("-",))[0])
                    await JSONResponse({"detail": CSRF_REFUSED}, 403)(scope, receive, secured)
                    return
            scope = {**scope, "headers": [*headers, (b"authorization", f"Bearer {session.token}".encode())],
                     "state": {**scope.get("state", {}), "ui_session": (session_id, session)}}
        await self.app(scope, receive, secured)
