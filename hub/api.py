"""The hub's HTTP API (FastAPI, served by uvicorn inside the hub's event loop).

Every route is a row of `ROUTES`: the least role that may call it (hub/tokens.py: viewer reads, operator acts on runs
and drains nodes, admin manages nodes and tokens) and, for a route that changes something, the action it is audited
as (hub/audit.py). A missing or unknown bearer token is answered 401, a known one with too low a role 403, each in
one line and each audited; an allowed action is audited, with the status it ended in, before the answer goes out.
The only public pages are the dashboard's shell and static files (hub/ui/); the OpenAPI document at /openapi.json
needs a token too.

One request must never stall the loop that also reads heartbeats: bodies are bounded while they arrive (`BodyLimit`),
workflows are parsed and validated in a worker thread within the hub's `Limits`, and audit and token files are
written (fsync'd) in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocols import kid_for

from . import __version__
from .api_bodies import AcceptNode, AddNode, Body, Drain, NewToken, Reason, SubmitRun
from .artifacts.api import NODE_SCHEME, install_routes as install_artifact_routes, is_upload
from .audit import AuditError, AuditLog, Record, RefusalBudget
from .errors import OperatorError
from .explain import waiting_reasons
from .limits import Limits, data_problem, over
from .registry import matches, parse_selector
from .state import Core, Run
from .tokens import ADMIN, OPERATOR, VIEWER, Caller, Role, TokenStore, allows
from .ui.routes import install_dashboard
from .workflow import Workflow, WorkflowError, load_workflow_text, workflow_from_object

if TYPE_CHECKING:
    from .service import Hub

log = logging.getLogger("fleetflow.hub")


@dataclass(frozen=True, slots=True)
class Route:
    """One API route: the least role that may call it, and the action it is audited as when allowed (None: a read,
    audited only when refused)."""

    method: str
    path: str
    role: Role
    action: str | None = None
    status: int = 200
    nodes: bool = False  # an accepted node may call it too, with a request signed by its key (hub/artifacts/)
    body: Any = None  # the answer's shape for the API's schema, where the handler encodes it itself (encoded_off_loop)


ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/openapi.json", VIEWER),
    Route("GET", "/health", VIEWER),
    Route("GET", "/metrics", VIEWER),
    Route("GET", "/runs", VIEWER),
    Route("GET", "/runs/{run_id}", VIEWER),
    Route("GET", "/nodes", VIEWER, body=list[dict[str, Any]]),
    Route("GET", "/nodes/{node_id}", VIEWER),
    Route("POST", "/runs", OPERATOR, "run.submit", 201),
    Route("POST", "/runs/{run_id}/cancel", OPERATOR, "run.cancel"),
    Route("POST", "/runs/{run_id}/fail", OPERATOR, "run.fail"),
    Route("POST", "/nodes/{node_id}/drain", OPERATOR, "node.drain"),
    Route("POST", "/nodes", ADMIN, "node.add", 201),
    Route("POST", "/nodes/accept-all", ADMIN, "node.accept-all"),
    Route("POST", "/nodes/{node_id}/accept", ADMIN, "node.accept"),
    Route("POST", "/nodes/{node_id}/reject", ADMIN, "node.reject"),
    Route("POST", "/nodes/{node_id}/revoke", ADMIN, "node.revoke"),
    Route("DELETE", "/nodes/{node_id}", ADMIN, "node.delete"),
    Route("GET", "/tokens", ADMIN),
    Route("POST", "/tokens", ADMIN, "token.create", 201),
    Route("DELETE", "/tokens/{name}", ADMIN, "token.revoke"),
    Route("GET", "/artifacts", VIEWER),
    Route("GET", "/artifacts/{sha256}", VIEWER, nodes=True),
    Route("POST", "/artifacts", OPERATOR, "artifact.add", 201),
    Route("GET", "/events", VIEWER),  # the dashboard's live stream (hub/ui/feed.py, docs/dashboard.md)
    Route("GET", "/ui/session", VIEWER),
    Route("GET", "/ui/fleet", VIEWER),
    Route("GET", "/ui/nodes/{node_id}", VIEWER),
    Route("GET", "/ui/runs/{run_id}", VIEWER),
    Route("POST", "/ui/login", VIEWER, "ui.login"),
    Route("POST", "/ui/logout", VIEWER, "ui.logout"),
    Route("GET", "/deployments", VIEWER),  # hub/deployments/api.py
    Route("GET", "/deployments/{dep_id}", VIEWER),
    Route("POST", "/deployments", OPERATOR, "deployment.create", 201),
    Route("POST", "/deployments/{dep_id}/pause", OPERATOR, "deployment.pause"),
    Route("POST", "/deployments/{dep_id}/resume", OPERATOR, "deployment.resume"),
    Route("POST", "/deployments/{dep_id}/cancel", OPERATOR, "deployment.cancel"),
)
UNAUTHORIZED: Final = ("missing or wrong bearer token (the admin token is DATA/api.token; fleetflow token create makes "
                       "others)")


@dataclass(slots=True)
class Pending:
    """What an audited action fills in as it learns it (the id of a run it made)."""

    target: str
    params: dict[str, Any] = field(default_factory=dict)


def _source(request: Request) -> str:
    return request.client.host if request.client is not None else "-"


def _status(exc: BaseException) -> int:
    if isinstance(exc, OperatorError):
        return exc.status
    return exc.status_code if isinstance(exc, HTTPException) else 500


class Access:
    """Who may call what, and the audit of what they did: the token store, the audit log, the clock."""

    def __init__(self, tokens: TokenStore, audit: AuditLog, clock: Callable[[], int]) -> None:
        self.tokens, self.audit, self.clock = tokens, audit, clock
        self.budget = RefusalBudget()
        self.node_auth: Callable[[Request, str], Caller | None] | None = None  # set by hub/artifacts/api.py

    async def admit(self, request: Request, route: Route, authorization: str) -> Caller:
        scheme, _, given = authorization.partition(" ")
        caller = (self.node_auth(request, given.strip()) if route.nodes and scheme == NODE_SCHEME and self.node_auth
                  else self.tokens.identify(given.strip()) if scheme.lower() == "bearer" else None)
        action = route.action or f"{route.method} {route.path}"
        if caller is None:
            await self._refused(request, Caller("-", "-"), action,  # type: ignore[arg-type]  # nobody: no role
                                "missing token" if not given.strip() else "wrong token", 401)
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
        if not allows(caller.role, route.role):
            await self._refused(request, caller, action, f"needs role {route.role}", 403)
            raise HTTPException(403, f"token {caller.name!r} has the role {caller.role}; {route.method} {route.path} "
                                     f"needs {route.role} or higher")
        request.state.caller, request.state.route = caller, route
        return caller

    async def _refused(self, request: Request, caller: Caller, action: str, why: str, status: int) -> None:
        unaudited = self.budget.take(_source(request), self.clock())
        if unaudited is None:
            return
        params: dict[str, Any] = {"refused": why, **({"unaudited": unaudited} if unaudited else {})}
        try:
            await self._write(request, caller, action, request.url.path, params, status)
        except (OSError, AuditError) as exc:  # the refusal stands either way
            log.error("audit log: cannot record a refused %s %s: %s", request.method, request.url.path, exc)

    async def _write(self, request: Request, caller: Caller, action: str, target: str, params: dict[str, Any],
                     status: int) -> None:
        record = Record(self.clock(), caller.name, caller.role, action, target, _source(request), status, params)
        await self.audit.write(record)

    @contextlib.asynccontextmanager
    async def audited(self, request: Request, target: str, **params: Any) -> AsyncIterator[Pending]:
        """Do an action, then audit it with the status it ended in, before the answer goes out. When the entry
        cannot be written the answer is 500 saying so: the action was done, but is not on record."""
        route: Route = request.state.route
        caller: Caller = request.state.caller
        note = Pending(target, dict(params))
        try:
            yield note
        except Exception as exc:
            try:
                await self._write(request, caller, str(route.action), note.target, note.params, _status(exc))
            except (OSError, AuditError) as failure:
                log.error("audit log: cannot record %s %s by %s: %s", route.action, note.target, caller.name, failure)
            raise
        try:
            await self._write(request, caller, str(route.action), note.target, note.params, route.status)
        except (OSError, AuditError) as failure:
            log.error("audit log: cannot record %s %s by %s: %s", route.action, note.target, caller.name, failure)
            raise HTTPException(500, f"{route.action} {note.target} was done, but the audit log cannot be written: "
                                     f"{failure}") from None


class Guard:
    """The role check of one route, as a FastAPI dependency: `unguarded` finds a route that has none."""

    def __init__(self, route: Route, access: Access) -> None:
        self.route, self.access = route, access

    async def __call__(self, request: Request, authorization: str = Header(default="")) -> Caller:
        return await self.access.admit(request, self.route, authorization)


def run_summary(run: Run) -> dict[str, Any]:
    return {"id": run.id, "workflow": run.workflow.name, "version": run.workflow.version, "state": run.state,
            "submitted_at": run.submitted_at, "finished_at": run.finished_at, "error": run.error}


def archived_summary(core: Core, run_id: str) -> dict[str, Any]:
    name, version, state, submitted, finished, error = core.archived[run_id]
    return {"id": run_id, "workflow": name, "version": version, "state": state, "submitted_at": submitted,
            "finished_at": finished, "error": error, "archived": True, "steps": []}


def run_detail(core: Core, run: Run, now: int) -> dict[str, Any]:
    """A run with its steps and attempts; `waiting` says why a queued step is not placed (hub/explain.py)."""
    waiting = waiting_reasons(core, run, now)
    steps = []
    for step in run.steps.values():
        attempts = [{"id": a.id, "node": a.node, "fence": a.fence, "state": a.state, "reason": a.reason,
                     "assigned_at": a.assigned_at, "started_at": a.started_at, "ended_at": a.ended_at}
                    for a in (core.attempts[i] for i in step.attempts)]
        steps.append({"id": step.id, "kind": step.kind, "state": step.state, "attempts": attempts,
                      "output": step.output, "error": step.error, "waiting": waiting.get(step.id)})
    return {**run_summary(run), "inputs": run.inputs, "deadline": run.deadline, "steps": steps}


def node_view(hub: Hub, node_id: str) -> dict[str, Any]:
    """A node as the API shows it. Every container in it is its own copy, or one the core replaces and never changes
    (a history entry, a conflict's boots), so `GET /nodes` can encode it off the loop (`encoded_off_loop`)."""
    node = hub.core.nodes.get(node_id)
    enrolled = hub.registry.get(node_id)
    view = hub.views.get(node_id)
    out: dict[str, Any] = {"id": node_id, "liveness": node.state if node else "unknown",
                           "health": node.health if node else "unknown",
                           "enrollment": enrolled["state"] if enrolled else "unknown",
                           "labels": dict(node.labels) if node else dict((enrolled or {}).get("labels", {})),
                           "profile": node.profile if node else (enrolled or {}).get("profile", "")}
    if node is not None:
        out.update(boot=node.boot, slots=node.slots, running=sorted(node.attempts), draining=node.draining,
                   caps=sorted(node.caps), resources=dict(node.resources), last_seen=node.last_seen,
                   changed_at=node.changed_at, throttled=node.throttled, breaker=node.breaker,
                   history=list(node.history), versions=dict(node.versions))
    # Two devices use this identity (hub/clones.py): {reason, since, last, boots}, else null.
    out["conflict"] = dict(node.conflict) if node is not None and node.conflict is not None else None
    if view is not None:
        out["telemetry"] = dict(view.telemetry)
        if view.heartbeat is not None:
            out["heartbeat"] = {"running": view.heartbeat.running, "free": view.heartbeat.free,
                                "outbox": view.heartbeat.outbox, "shed": view.heartbeat.shed,
                                "rejected": dict(view.heartbeat.rejected)}
    if enrolled is not None:
        out["key"] = enrolled["key"]
        out["kid"] = enrolled["kid"]  # the fingerprint `nodes accept --kid` names
    return out


class BodyLimit:
    """ASGI middleware: a request body over `limits.request_bytes` is refused with 413, by its Content-Length when it
    has one, else (chunked) as soon as the bytes received pass the limit, so nothing larger is ever buffered.

    The connection is not closed after the refusal: closing a socket with unread data makes the kernel reset the
    connection, and a client still sending then often loses the 413. uvicorn drops the rest of the body as it arrives
    instead, in small slices between other work, without keeping it (as a server's "lingering close" does).
    """

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope):  # an upload is bounded by the artifact store
            await self.app(scope, receive, send)
            return
        limit = self.limits.request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await JSONResponse({"detail": self.refusal(declared.decode())}, 413)(scope, receive, send)
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI passes an HTTPException raised while reading the body on to its handler, which answers.
                    raise HTTPException(413, self.refusal(f"more than {limit}"))
            return message

        await self.app(scope, bounded_receive, send)

    def refusal(self, size: str) -> str:
        return f"request body: {size} bytes, {over(self.limits, 'request_bytes')}"


class SafeJSONResponse(JSONResponse):
    """JSON of anything a request or the hub holds, where FastAPI's own answer would be a 500. Text is ASCII-escaped
    (a JSON request may carry a lone surrogate, "\\ud800", which UTF-8 cannot encode); NaN and the infinities (YAML's
    .nan, a float a node reported) become null, which JSON has instead; bytes (a step's output may hold them) are
    text, as FastAPI shows them, with what is not UTF-8 escaped."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_json_safe(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


async def encoded_off_loop(content: Any) -> Response:
    """`content` as JSON, encoded in a worker thread. For the large answers (a fleet's nodes: a quarter of a second
    of encoding for 5,000 of them, which on the loop would hold up every message the hub ingests meanwhile).
    `content` is built on the loop, from one consistent state, and must hold nothing the loop changes afterwards:
    its own containers, or ones the core only ever replaces."""
    body = await asyncio.to_thread(lambda: SafeJSONResponse(content).body)
    return Response(body, media_type="application/json")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _install_error_answers(app: FastAPI) -> None:
    """Refusals answered as SafeJSONResponse. FastAPI's own 422 echoes each error's input, which fails (a 500) on a
    body that is not UTF-8 or holds a NaN: the input is left out, `loc` and `msg` say what is wrong."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return SafeJSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):  # no body allowed
            return Response(status_code=exc.status_code, headers=exc.headers)
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def parse_submission(body: SubmitRun, limits: Limits) -> Workflow:
    """The workflow of a submission, parsed and validated within `limits`. CPU-bound: runs in a worker thread."""
    problem = data_problem(body.inputs, "inputs", limits, workflow=False)
    if problem is not None:
        raise WorkflowError([problem])
    return (load_workflow_text(body.workflow, "workflow", limits) if isinstance(body.workflow, str)
            else workflow_from_object(body.workflow, "workflow", limits))


def create_app(hub: Hub) -> FastAPI:
    """The API: every route of `ROUTES`, each behind its role check; the handlers below are bound to them by method
    and path, and a handler or route left over stops the start."""
    # The docs pages and the schema would otherwise answer without a token; the schema is served below, guarded.
    app = FastAPI(title="fleetflow hub", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=SafeJSONResponse)
    _install_error_answers(app)
    app.add_middleware(BodyLimit, limits=hub.config.limits)
    data = Path(hub.config.data)
    access = Access(TokenStore(data, hub.check_token), AuditLog(data, lambda: hub.key), hub.clock)
    handlers: dict[tuple[str, str], Callable[..., Any]] = {}

    def handles(method: str, path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def bind_handler(handler: Callable[..., Any]) -> Callable[..., Any]:
            handlers[(method, path)] = handler
            return handler
        return bind_handler

    @app.exception_handler(OperatorError)
    async def operator_error(request: Request, exc: OperatorError) -> JSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status_code=exc.status)

    @handles("GET", "/openapi.json")
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @handles("GET", "/health")
    async def health() -> dict[str, Any]:
        core = hub.core
        return {"status": "overloaded" if core.overloaded else "ok", "fleet": hub.config.fleet, "boot": hub.signer.boot,
                "connected": hub.session is not None,
                "journal_seq": hub.journal.last_seq, "nodes": len(core.nodes), "active_runs": len(core.active),
                "queue": len(core.queue), "version": __version__, "public_key": hub.public_key.hex()}

    @handles("POST", "/runs")
    async def submit(request: Request, body: SubmitRun,
                     idempotency_key: str | None = Header(default=None)) -> dict[str, Any]:
        async with access.audited(request, "") as note:
            try:
                # Parsing and validating may take most of a second: in a thread, so heartbeats keep being read.
                workflow = await asyncio.to_thread(parse_submission, body, hub.config.limits)
            except WorkflowError as exc:
                raise HTTPException(422, str(exc)) from None
            note.params.update(workflow=workflow.name, version=workflow.version)
            run_id, created = await hub.submit(workflow, body.inputs, idempotency_key)
            note.target, note.params["created"] = run_id, created
        return {"id": run_id, "created": created}

    @handles("GET", "/runs")
    async def list_runs(state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        runs = sorted(hub.core.runs.values(), key=lambda r: r.seq, reverse=True)
        out = [run_summary(r) for r in runs if state is None or r.state == state][:limit]
        for run_id in reversed(list(hub.core.archived)):  # older, finished runs, newest first
            if len(out) >= limit:
                break
            summary = archived_summary(hub.core, run_id)
            if state is None or summary["state"] == state:
                out.append(summary)
        return out

    @handles("GET", "/runs/{run_id}")
    async def show_run(run_id: str) -> Any:
        run = hub.core.runs.get(run_id)
        if run is None:
            if run_id in hub.core.archived:
                return archived_summary(hub.core, run_id)
            raise HTTPException(404, f"no run {run_id!r}")
        # Answered as it is: FastAPI's encoder fails (a 500) on bytes a step's output holds that are not UTF-8.
        return SafeJSONResponse(run_detail(hub.core, run, hub.clock()))

    for verb, fail, by_default in (("cancel", False, "cancelled by an operator"),
                                   ("fail", True, "failed by an operator")):
        def stop_run(fail: bool = fail, by_default: str = by_default) -> Callable[..., Any]:
            async def stop(request: Request, run_id: str, body: Reason | None = None) -> Any:
                reason = (body.reason if body else "") or by_default
                async with access.audited(request, run_id, reason=reason):
                    await hub.cancel_run(run_id, reason, fail)
                return await show_run(run_id)
            return stop
        handles("POST", f"/runs/{{run_id}}/{verb}")(stop_run())

    @handles("GET", "/nodes")
    async def list_nodes(label: list[str] = Query(default=[], description="KEY=VALUE; repeatable, all must match")
                         ) -> Response:
        try:
            selector = parse_selector(label)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        ids = sorted(set(hub.core.nodes) | {d["id"] for d in hub.registry.all()})
        views = [node_view(hub, i) for i in ids]
        return await encoded_off_loop([v for v in views if matches(v["labels"], selector)] if selector else views)

    @handles("GET", "/nodes/{node_id}")
    async def show_node(node_id: str) -> dict[str, Any]:
        if node_id not in hub.core.nodes and hub.registry.get(node_id) is None:
            raise HTTPException(404, f"no node {node_id!r}")
        return node_view(hub, node_id)

    @handles("POST", "/nodes")
    async def add_node(request: Request, body: AddNode) -> dict[str, Any]:
        async with access.audited(request, body.id) as note:
            try:
                key = bytes.fromhex(body.public_key)
            except ValueError:
                raise HTTPException(422, "public_key must be 64 hex characters") from None
            note.params["kid"] = kid_for(key).hex()
            return await hub.add_node(body.id, key)

    @handles("POST", "/nodes/accept-all")
    async def accept_all(request: Request) -> list[dict[str, Any]]:
        """Every pending node, each with the key it asks with now; rejected and revoked nodes are not pending."""
        async with access.audited(request, "*") as note:
            accepted = await hub.admin.accept_all()
            note.params["accepted"] = [f"{d['id']} {d['kid']}" for d in accepted]
        return accepted

    @handles("DELETE", "/nodes/{node_id}")
    async def delete_node(request: Request, node_id: str, force: bool = False) -> dict[str, Any]:
        # 409 while it is online or suspected, unless forced (hub/node_admin.py)
        async with access.audited(request, node_id, force=force):
            return await hub.admin.delete(node_id, force)

    @handles("POST", "/nodes/{node_id}/accept")
    async def accept(request: Request, node_id: str, body: AcceptNode) -> dict[str, Any]:
        # 409 if the node's key is no longer the one named: it changed after the operator reviewed it.
        async with access.audited(request, node_id, kid=body.kid):
            return await hub.node_action(node_id, "accept", kid=body.kid)

    for action in ("reject", "revoke"):
        def route(action: str = action) -> Callable[..., Any]:
            async def act(request: Request, node_id: str) -> dict[str, Any]:
                async with access.audited(request, node_id):
                    return await hub.node_action(node_id, action)
            return act
        handles("POST", f"/nodes/{{node_id}}/{action}")(route())

    @handles("POST", "/nodes/{node_id}/drain")
    async def drain(request: Request, node_id: str, body: Drain | None = None) -> dict[str, Any]:
        on = body.on if body else True
        async with access.audited(request, node_id, on=on):
            return await hub.node_action(node_id, "drain", on)

    @handles("GET", "/metrics")
    async def metrics() -> Response:
        return Response(hub.metrics.render(), media_type="text/plain; version=0.0.4")

    @handles("GET", "/tokens")
    async def list_tokens() -> list[dict[str, Any]]:
        return access.tokens.listing()

    @handles("POST", "/tokens")
    async def create_token(request: Request, body: NewToken) -> dict[str, Any]:
        async with access.audited(request, body.name, role=body.role):
            token, secret = await asyncio.to_thread(access.tokens.create, body.name, body.role,
                                                    request.state.caller.name, hub.clock())
        return {**token.public(), "token": secret}  # the only time the token is shown

    @handles("DELETE", "/tokens/{name}")
    async def revoke_token(request: Request, name: str) -> dict[str, Any]:
        async with access.audited(request, name) as note:
            token = await asyncio.to_thread(access.tokens.revoke, name)
            note.params["role"] = token.role
        return {**token.public(), "state": "revoked"}

    install_artifact_routes(hub, access, handles)
    install_dashboard(app, hub, access, handles)
    from .deployments.api import add_deployment_routes  # here: it builds on this module's Body and Access

    add_deployment_routes(hub, access, handles)
    for spec in ROUTES:
        handler = handlers.pop((spec.method, spec.path), None)
        if handler is None:
            raise RuntimeError(f"no handler for {spec.method} {spec.path} (hub/api.py ROUTES)")
        app.add_api_route(spec.path, handler, methods=[spec.method], status_code=spec.status,
                          dependencies=[Depends(Guard(spec, access))], include_in_schema=spec.path != "/openapi.json",
                          name=spec.action or f"{spec.method} {spec.path}",
                          **({"response_model": spec.body} if spec.body is not None else {}))
    if handlers or unguarded(app):
        raise RuntimeError(f"routes without a role in hub/api.py ROUTES: {sorted(handlers) or unguarded(app)}")
    return app


def unguarded(app: FastAPI) -> list[str]:
    """The app's routes that check no role: there must be none (the start and a test fail otherwise)."""
    return [f"{sorted(r.methods or ())} {r.path}" for r in app.routes if isinstance(r, APIRoute)
            and not any(isinstance(d.call, Guard) for d in r.dependant.dependencies)]


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a port in use still fails
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve(hub: Hub, sock: socket.socket) -> None:
    """Serve the API on a socket already bound (Hub.run binds it first, so a port in use stops the start)."""
    try:
        app = create_app(hub)
    except BaseException:
        sock.close()  # nobody serves it: the hub stops (crash-only), and a test's loop goes on without the leak
        raise
    # proxy_headers off: the audit's "from" is the peer that connected, never an X-Forwarded-For it chose to send.
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, proxy_headers=False)
    server = uvicorn.Server(config)
    # The hub owns SIGTERM and SIGINT; uvicorn would take them for itself (signal.signal) while it serves.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    try:
        await server.serve(sockets=[sock])
    except asyncio.CancelledError:
        server.should_exit = True
        raise
    # The hub stops the API by cancelling it: a server that returned on its own left the hub without an API.
    raise RuntimeError("the API server stopped serving")
