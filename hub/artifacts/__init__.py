"""Artifacts: content-addressed files with manifests signed by the hub key (README.md beside this file).

`resolve_artifacts(spec, store)` is what anything that submits runs calls: it gives every `artifact.install` step
of a workflow spec the signed manifest of the `NAME@VERSION` it names.
"""

from .resolve import INSTALL, resolve_artifacts
from .store import (ArtifactConflict, ArtifactError, ArtifactNotFound, ArtifactStore, ArtifactTooLarge, Stored,
                    parse_ref)

__all__ = ["INSTALL", "ArtifactConflict", "ArtifactError", "ArtifactNotFound", "ArtifactStore", "ArtifactTooLarge",
           "Stored", "parse_ref", "resolve_artifacts"]
