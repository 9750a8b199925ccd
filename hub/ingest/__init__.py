"""Ingest past one core (`hub run --ingest-workers N`): worker processes on an MQTT shared subscription verify and
decode node messages, and the core restores each node's order before its replay check (README.md here)."""

from __future__ import annotations

from .reorder import ArrivedLate, ReorderBuffer, would_accept

SHARE_GROUP = "fleetflow-hub"  # the workers' shared subscription: $share/fleetflow-hub/fleetflow/v1/F/node/+/KIND

__all__ = ["SHARE_GROUP", "ArrivedLate", "ReorderBuffer", "would_accept"]
