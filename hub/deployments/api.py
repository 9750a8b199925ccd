"""The deployments' HTTP routes, added to the hub's API by `add_deployment_routes` (hub/api.py lists each in its
ROUTES table with its role: viewer reads, operator creates, pauses, resumes and cancels, each audited).

`POST /deployments` takes the request `fleetflow deploy` builds (hub/deployments/model.py) and answers 201 with
`{"id"}`, or 422 with the field named. The workflow and the request are parsed in a worker thread within the hub's
limits, so a large workflow never stalls the loop that reads heartbeats.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Query, Request
from pydantic import ConfigDict, Field

from ..api import Access, Body
from ..limits import Limits, data_problem
from ..workflow import WorkflowError
from .core import Deployment
from .model import DeploymentError, DeploymentSpec, parse_request
from .views import archived_detail, detail, summary

if TYPE_CHECKING:
    from ..service import Hub

Handles = Callable[[str, str], Callable[[Callable[..., Any]], Callable[..., Any]]]
MAX_LISTED = 1000  # summaries one GET /deployments answers at most


class DeploymentBody(Body):
    """The workflow, and one field per `fleetflow deploy` flag (checked by hub/deployments/model.py, which names
    an unknown one)."""

    model_config = ConfigDict(extra="allow")
    workflow: str | dict[str, Any] = Field(description="the workflow as YAML text or as an object")


class Control(Body):
    force: bool = Field(False, description="cancel: end every execution now, cancelling its run")
    reason: str = ""


def profile_label_keys() -> set[str]:
    """Label keys the firmware profiles on this hub's search path declare (a bare KEY=VALUE selector may use them)."""
    from agent.runtime.profiles import ProfileError, available, parse_profile

    keys: set[str] = set()
    for path in available().values():
        try:
            keys.update(parse_profile(path).labels)
        except ProfileError:
            continue  # `fleetflow profiles` reports a broken profile; it declares no keys here
    return keys


def parse_deployment(body: dict[str, Any], known: set[str], now: int, limits: Limits) -> DeploymentSpec:
    """CPU-bound (YAML, validation, profile files): runs in a worker thread."""
    problem = data_problem(body.get("inputs") or {}, "inputs", limits, workflow=False)
    if problem is not None:
        raise WorkflowError([problem])
    return parse_request(body, frozenset(known | profile_label_keys()), now, limits)


def add_deployment_routes(hub: Hub, access: Access, handles: Handles) -> None:
    def find(dep_id: str) -> Deployment:
        dep = hub.core.deploys.deployments.get(dep_id)
        if dep is None:
            raise HTTPException(404, f"no deployment {dep_id!r}")
        return dep

    @handles("POST", "/deployments")
    async def create(request: Request, body: DeploymentBody) -> dict[str, Any]:
        async with access.audited(request, "") as note:
            # The label keys known now: the fleet's (read here, on the loop that changes them) and the registry's.
            known = {key for node in hub.core.nodes.values() for key in node.labels}
            known.update(key for doc in hub.registry.all() for key in doc.get("labels", {}))
            try:
                spec = await asyncio.to_thread(parse_deployment, body.model_dump(), known, hub.clock(),
                                               hub.config.limits)
            except (DeploymentError, WorkflowError) as exc:
                raise HTTPException(422, str(exc)) from None
            note.params.update(component=spec.component, version=spec.version, target=list(spec.target.selectors))
            dep_id = await hub.deploy(spec, request.state.caller.name)
            note.target = dep_id
        return {"id": dep_id}

    @handles("GET", "/deployments")
    async def list_deployments(state: str | None = None,
                               limit: int = Query(200, ge=1, le=MAX_LISTED)) -> list[dict[str, Any]]:
        """Newest first: the deployments kept whole, then the archived ones' summaries; only `limit` are built."""
        deploys = hub.core.deploys
        newest = sorted(deploys.deployments.values(), key=lambda d: d.seq, reverse=True)
        out = [summary(d) for d in itertools.islice((d for d in newest if state is None or d.state == state), limit)]
        older = (s for s in reversed(deploys.archived.values()) if state is None or s["state"] == state)
        return out + list(itertools.islice(older, limit - len(out)))

    @handles("GET", "/deployments/{dep_id}")
    async def show(dep_id: str) -> dict[str, Any]:
        archived = hub.core.deploys.archived.get(dep_id)
        return archived_detail(archived) if archived is not None else detail(find(dep_id))

    for action in ("pause", "resume", "cancel"):
        def control(action: str = action) -> Callable[..., Any]:
            async def act(request: Request, dep_id: str, body: Control | None = None) -> dict[str, Any]:
                given = body or Control()
                reason = given.reason or f"{action} by {request.state.caller.name}"
                async with access.audited(request, dep_id, force=given.force, reason=reason):
                    find(dep_id)
                    await hub.control_deployment(dep_id, action, given.force, reason)
                return detail(find(dep_id))
            return act
        handles("POST", f"/deployments/{{dep_id}}/{action}")(control())
