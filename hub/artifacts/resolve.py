"""Where a workflow's `artifact.install` steps get the signed manifest of the artifact they name: at submission, so
the run (as journaled, and as every retry and migration of it sends it) carries the exact manifest it started with,
and a node never asks the hub which bytes a name means."""

from __future__ import annotations

import copy
from typing import Any, Final

from .store import ArtifactError, ArtifactStore, parse_ref

INSTALL: Final = "artifact.install"


def resolve_artifacts(spec: dict[str, Any], store: ArtifactStore) -> dict[str, Any]:
    """A copy of a workflow spec (`Workflow.model_dump(by_alias=True, mode="json")`) in which every
    `artifact.install` step, and compensation, that names `with: {artifact: NAME@VERSION}` also carries
    `with.manifest`: the hub-signed manifest, in hex. A step that carries a `manifest` of its own (and no
    `artifact`) is passed on as it is: the node verifies it against the hub key it pinned like any other.

    Raises `ArtifactError` (422, or 404 for an unknown artifact) naming the step. Blocking (it may hash a blob
    after a hub key rotation): call it in a worker thread."""
    out = copy.deepcopy(spec)
    for index, step in enumerate(out.get("steps", ())):
        targets = [(f"steps[{index}] ({step.get('id')})", step)]
        if isinstance(step.get("compensate"), dict):
            targets.append((f"steps[{index}] ({step.get('id')}).compensate", step["compensate"]))
        for where, target in targets:
            if target.get("uses") == INSTALL:
                target["with"] = _with_manifest(target.get("with") or {}, where, store)
    return out


def _with_manifest(inputs: dict[str, Any], where: str, store: ArtifactStore) -> dict[str, Any]:
    ref = inputs.get("artifact")
    if "manifest" in inputs:
        if ref is not None:
            raise ArtifactError(f"{where}.with: give artifact (the hub adds its manifest) or manifest, not both")
        return inputs
    if ref is None:
        raise ArtifactError(f"{where}.with.artifact: {INSTALL} needs the artifact to install, as NAME@VERSION")
    name, version = parse_ref(ref, f"{where}.with.artifact")
    try:
        signed = store.for_run(name, version)
    except ArtifactError as exc:
        raise type(exc)(f"{where}.with.artifact: {exc}") from None
    return {**inputs, "manifest": signed.hex()}
