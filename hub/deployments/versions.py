"""Semantic versions (semver.org 2.0.0) and the specifier sets of a workflow's `migrates_from`, pure.

A small parser of our own rather than `packaging`: PEP 440 refuses valid semver pre-releases ("1.0.0-foo.1") and
orders others differently, and the rules we need are few. Precedence is semver's: numeric MAJOR.MINOR.PATCH, a
pre-release below its release, pre-release identifiers compared one by one (numbers numerically and below text),
build metadata ignored. A specifier set is clauses joined by commas, each an operator (>=, >, <=, <, ==, !=; none
means ==) and a version whose missing parts are 0 (">=1.2,<2" is 1.2.0 up to, not including, 2.0.0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from protocols import FleetflowError

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_PARTIAL = re.compile(r"^(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?(?:-([0-9A-Za-z.-]+))?$")
_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*(\S+)\s*$")
# The inventory's word for a node an update was stopped on part-way (cancel --force): the hub cannot say which
# version it runs, so it claims none; any version may be installed over it, as over no version.
UNKNOWN = "unknown"


class VersionError(FleetflowError, ValueError):
    """A version or specifier that is not semver."""


@total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    pre: tuple[int | str, ...] = ()

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
        # A release sorts above its pre-releases; within a pre-release, numbers sort below text.
        pre = tuple((0, p) if isinstance(p, int) else (1, p) for p in self.pre)
        return self.major, self.minor, self.patch, 0 if self.pre else 1, pre

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        mine, theirs = self._key(), other._key()
        if mine[:4] != theirs[:4]:
            return mine[:4] < theirs[:4]
        # Identifiers one by one; a shorter list that is a prefix of the longer sorts first (semver 11.4.4).
        for a, b in zip(mine[4], theirs[4]):
            if a != b:
                return a < b  # type: ignore[operator]  # (kind, value): kinds equal means values of one type
        return len(mine[4]) < len(theirs[4])

    def __str__(self) -> str:
        pre = "-" + ".".join(str(p) for p in self.pre) if self.pre else ""
        return f"{self.major}.{self.minor}.{self.patch}{pre}"


def _pre(text: str | None) -> tuple[int | str, ...]:
    if not text:
        return ()
    parts = text.split(".")
    if any(not p for p in parts):
        raise VersionError(f"pre-release {text!r} has an empty identifier")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def parse_version(text: str) -> Version:
    """A full semantic version, MAJOR.MINOR.PATCH with an optional pre-release and build metadata."""
    match = _SEMVER.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise VersionError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    return Version(int(match[1]), int(match[2]), int(match[3]), _pre(match[4]))


def _partial(text: str) -> Version:
    match = _PARTIAL.match(text)
    if match is None:
        raise VersionError(f"{text!r} is not a version (MAJOR[.MINOR[.PATCH]])")
    return Version(int(match[1]), int(match[2] or 0), int(match[3] or 0), _pre(match[4]))


_TESTS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
          "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


@dataclass(frozen=True)
class SpecifierSet:
    """Clauses that must all hold, e.g. ">=1.2,<2"."""

    text: str
    clauses: tuple[tuple[str, Version], ...]

    def contains(self, version: Version) -> bool:
        return all(_TESTS[op](version, bound) for op, bound in self.clauses)


def parse_specifiers(text: str) -> SpecifierSet:
    if not isinstance(text, str) or not text.strip():
        raise VersionError("an empty specifier: give clauses such as \">=1.2,<2\"")
    clauses = []
    for raw in text.split(","):
        match = _CLAUSE.match(raw)
        if match is None:
            raise VersionError(f"specifier {text!r}: an empty clause")
        clauses.append((match[1] or "==", _partial(match[2])))
    return SpecifierSet(text, tuple(clauses))


def migration_problem(current: str | None, target: str, migrates_from: list[str] | tuple[str, ...]) -> str | None:
    """Why a node at `current` cannot take `target`, or None. A node without the component, or a change within one
    MAJOR.MINOR (a patch, up or down), needs nothing; any other change needs a `migrates_from` set covering
    `current`. A node whose version is UNKNOWN needs nothing either: installing a known version is what mends it."""
    if current is None or current == UNKNOWN:
        return None
    try:
        have = parse_version(current)
    except VersionError:
        return f"the node reports version {current!r}, which is not semver: no migration can cover it"
    want = parse_version(target)
    if (have.major, have.minor) == (want.major, want.minor):
        return None
    if any(parse_specifiers(spec).contains(have) for spec in migrates_from):
        return None
    declared = ", ".join(repr(s) for s in migrates_from) or "none"
    return (f"no migration declared from {have} to {want} (a minor or major change; migrates_from: {declared})")
