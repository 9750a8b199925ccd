"""The API's request bodies: pydantic models, each refusing text no journal, message or audit line can encode."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator


def lone_surrogate(data: Any) -> str | None:
    """Where a decoded JSON value holds a lone surrogate, if it does (iterative: bodies may nest deeply)."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"text holds a lone surrogate at character {exc.start}, which is not Unicode"
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


class Body(BaseModel):
    """A request body. JSON can spell a lone surrogate ("\\ud800"), which no journal, CBOR message, audit line or
    YAML parser can encode: such a body is refused here (422) rather than fail wherever it is first encoded."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        problem = lone_surrogate(data)
        if problem is not None:
            raise ValueError(problem)
        return data


class SubmitRun(Body):
    workflow: str | dict[str, Any] = Field(description="the workflow as YAML text or as an object")
    inputs: dict[str, Any] = Field(default_factory=dict)


class Reason(Body):
    reason: str = ""


class Drain(Body):
    on: bool = True


class AddNode(Body):
    id: str
    public_key: str = Field(description="Ed25519 public key, 64 hex characters")


class NewToken(Body):
    name: str = Field(description="1 to 64 of A-Z a-z 0-9 _ . -")
    role: str = Field(description="viewer, operator or admin")


class AcceptNode(Body):
    kid: str = Field(pattern=r"^([0-9a-fA-F]{16}|[0-9a-fA-F]{64})$",
                     description="the kid of the key the operator reviewed (16 hex characters), or that key (64)")
