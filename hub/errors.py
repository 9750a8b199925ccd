"""Errors an operator request can end in. Each carries the HTTP status the API answers with, so the API maps a class
to a response and never reads a message to decide what happened."""

from __future__ import annotations

from typing import ClassVar

from protocols import FleetflowError


class OperatorError(FleetflowError):
    """An operator request that cannot be done; `status` is the HTTP status to answer with."""

    status: ClassVar[int] = 400


class NotFound(OperatorError):
    status = 404


class Conflict(OperatorError):
    """The request contradicts what the hub holds (a key already enrolled, a node still online)."""

    status = 409


class Unprocessable(OperatorError):
    """The request is well-formed but its content cannot be acted on (a workflow that can never run, a bad key)."""

    status = 422


class Unavailable(OperatorError):
    """The hub could not act on the request; the same request may work later."""

    status = 503


class InternalError(OperatorError):
    status = 500


class HubTaskFailed(FleetflowError):
    """An unexpected exception in one of the hub's long-running tasks (the core loop, the API, the load monitor, the
    mirrors, ...). The hub stops rather than go on without it: everything it acted on is in the journal, and a
    supervisor's restart resumes from there (crash-only). `task` names the task."""

    def __init__(self, task: str, message: str) -> None:
        super().__init__(message)
        self.task = task
