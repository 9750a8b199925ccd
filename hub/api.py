"""The hub's HTTP API (FastAPI, served by uvicorn inside the hub's event loop). Every route needs the bearer token
written to DATA/api.token, the OpenAPI document at /openapi.json too; there are no public docs pages.

One request must never stall the loop that also reads heartbeats: bodies are bounded while they arrive (`BodyLimit`),
and workflows are parsed and validated in a worker thread within the hub's `Limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.telemetry import now_ms

from . import __version__
from .explain import waiting_reasons
from .limits import Limits, data_problem, over
from .registry import matches, parse_selector
from .service import OperatorError
from .state import Core, Run
from .workflow import Workflow, WorkflowError, load_workflow_text, workflow_from_object

if TYPE_CHECKING:
    from .service import Hub


class SubmitRun(BaseModel):
    workflow: str | dict[str, Any] = Field(description="the workflow as YAML text or as an object")
    inputs: dict[str, Any] = Field(default_factory=dict)


class Reason(BaseModel):
    reason: str = ""


class Drain(BaseModel):
    on: bool = True


class AddNode(BaseModel):
    id: str
    public_key: str = Field(description="Ed25519 public key, 64 hex characters")


class AcceptNode(BaseModel):
    kid: str = Field(pattern=r"^([0-9a-fA-F]{16}|[0-9a-fA-F]{64})$",
                     description="the kid of the key the operator reviewed (16 hex characters), or that key (64)")


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
                   caps=sorted(node.caps), resources=node.resources, last_seen=node.last_seen,
                   changed_at=node.changed_at, throttled=node.throttled, breaker=node.breaker,
                   history=list(node.history))
    # Two devices use this identity (hub/clones.py): {reason, since, last, boots}, else null.
    out["conflict"] = dict(node.conflict) if node is not None and node.conflict is not None else None
    if view is not None:
        out["telemetry"] = view.telemetry
        if view.heartbeat is not None:
            out["heartbeat"] = {"running": view.heartbeat.running, "free": view.heartbeat.free,
                                "outbox": view.heartbeat.outbox, "shed": view.heartbeat.shed,
                                "rejected": view.heartbeat.rejected}
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
        if scope["type"] != "http":
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


def parse_submission(body: SubmitRun, limits: Limits) -> Workflow:
    """The workflow of a submission, parsed and validated within `limits`. CPU-bound: runs in a worker thread."""
    problem = data_problem(body.inputs, "inputs", limits, workflow=False)
    if problem is not None:
        raise WorkflowError([problem])
    return (load_workflow_text(body.workflow, "workflow", limits) if isinstance(body.workflow, str)
            else workflow_from_object(body.workflow, "workflow", limits))


def create_app(hub: Hub) -> FastAPI:
    # The docs pages and the schema would otherwise answer without a token; the schema is served below, guarded.
    app = FastAPI(title="fleetflow hub", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limits=hub.config.limits)

    def auth(authorization: str = Header(default="")) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or not hub.check_token(token):
            raise HTTPException(401, "missing or wrong bearer token (see DATA/api.token)",
                                headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(auth)]

    @app.exception_handler(OperatorError)
    async def operator_error(request: Request, exc: OperatorError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/health", dependencies=guarded)
    async def health() -> dict[str, Any]:
        core = hub.core
        return {"status": "overloaded" if core.overloaded else "ok", "fleet": hub.config.fleet, "boot": hub.signer.boot,
                "connected": hub.session is not None,
                "journal_seq": hub.journal.last_seq, "nodes": len(core.nodes), "active_runs": len(core.active),
                "queue": len(core.queue), "version": __version__, "public_key": hub.public_key.hex()}

    @app.post("/runs", dependencies=guarded, status_code=201)
    async def submit(body: SubmitRun, idempotency_key: str | None = Header(default=None)) -> dict[str, Any]:
        try:
            # Parsing and validating may take most of a second: in a thread, so heartbeats keep being read.
            workflow = await asyncio.to_thread(parse_submission, body, hub.config.limits)
        except WorkflowError as exc:
            raise HTTPException(422, str(exc)) from None
        run_id, created = await hub.submit(workflow, body.inputs, idempotency_key)
        return {"id": run_id, "created": created}

    @app.get("/runs", dependencies=guarded)
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

    @app.get("/runs/{run_id}", dependencies=guarded)
    async def show_run(run_id: str) -> dict[str, Any]:
        run = hub.core.runs.get(run_id)
        if run is None:
            if run_id in hub.core.archived:
                return archived_summary(hub.core, run_id)
            raise HTTPException(404, f"no run {run_id!r}")
        return run_detail(hub.core, run, now_ms())

    @app.post("/runs/{run_id}/cancel", dependencies=guarded)
    async def cancel(run_id: str, body: Reason | None = None) -> dict[str, Any]:
        await hub.cancel_run(run_id, (body.reason if body else "") or "cancelled by an operator", False)
        return await show_run(run_id)

    @app.post("/runs/{run_id}/fail", dependencies=guarded)
    async def force_fail(run_id: str, body: Reason | None = None) -> dict[str, Any]:
        await hub.cancel_run(run_id, (body.reason if body else "") or "failed by an operator", True)
        return await show_run(run_id)

    @app.get("/nodes", dependencies=guarded)
    async def list_nodes(label: list[str] = Query(default=[], description="KEY=VALUE; repeatable, all must match")
                         ) -> list[dict[str, Any]]:
        try:
            selector = parse_selector(label)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        ids = sorted(set(hub.core.nodes) | {d["id"] for d in hub.registry.all()})
        views = (node_view(hub, i) for i in ids)
        return [v for v in views if matches(v["labels"], selector)]

    @app.get("/nodes/{node_id}", dependencies=guarded)
    async def show_node(node_id: str) -> dict[str, Any]:
        if node_id not in hub.core.nodes and hub.registry.get(node_id) is None:
            raise HTTPException(404, f"no node {node_id!r}")
        return node_view(hub, node_id)

    @app.post("/nodes", dependencies=guarded, status_code=201)
    async def add_node(body: AddNode) -> dict[str, Any]:
        try:
            key = bytes.fromhex(body.public_key)
        except ValueError:
            raise HTTPException(422, "public_key must be 64 hex characters") from None
        return await hub.add_node(body.id, key)

    @app.post("/nodes/accept-all", dependencies=guarded)
    async def accept_all() -> list[dict[str, Any]]:
        """Every pending node, each with the key it asks with now; rejected and revoked nodes are not pending."""
        return await hub.admin.accept_all()

    @app.delete("/nodes/{node_id}", dependencies=guarded)
    async def delete_node(node_id: str, force: bool = False) -> dict[str, Any]:
        # 409 while it is online or suspected, unless forced (hub/node_admin.py)
        return await hub.admin.delete(node_id, force)

    @app.post("/nodes/{node_id}/accept", dependencies=guarded, name="accept_node")
    async def accept(node_id: str, body: AcceptNode) -> dict[str, Any]:
        # 409 if the node's key is no longer the one named: it changed after the operator reviewed it.
        return await hub.node_action(node_id, "accept", kid=body.kid)

    for action in ("reject", "revoke"):
        def route(action: str = action) -> Any:
            async def act(node_id: str) -> dict[str, Any]:
                return await hub.node_action(node_id, action)
            return act
        app.post(f"/nodes/{{node_id}}/{action}", dependencies=guarded, name=f"{action}_node")(route())

    @app.post("/nodes/{node_id}/drain", dependencies=guarded)
    async def drain(node_id: str, body: Drain | None = None) -> dict[str, Any]:
        return await hub.node_action(node_id, "drain", body.on if body else True)

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        return Response(hub.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


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
    config = uvicorn.Config(create_app(hub), log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    # The hub owns SIGTERM and SIGINT; uvicorn would take them for itself (signal.signal) while it serves.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    try:
        await server.serve(sockets=[sock])
    except asyncio.CancelledError:
        server.should_exit = True
        raise
