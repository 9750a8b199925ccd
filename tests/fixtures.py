"""Shared pytest fixtures: real brokers on free ports, stopped after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import KINDS, Broker


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A real broker of each kind in turn (the test runs once per broker)."""
    b = Broker(request.param, tmp_path / f"broker-{request.param}").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    b = Broker("mosquitto", tmp_path / "broker-mosquitto").start()
    try:
        yield b
    finally:
        b.stop()
