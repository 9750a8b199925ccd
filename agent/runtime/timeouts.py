"""Bounded waits that keep a cancellation.

On Python 3.11, `asyncio.wait_for` returns normally when its task is cancelled in the same loop iteration as the
thing it waits for completes: the cancellation is lost. A power-cut device (the simulator cancels its agent, sim/
worker.py) then went on running with its connection reset, reconnected in the boot the hub had already buried, and
its outbox never drained (a 5,000-device run: 49 of 50 power cuts landed). `asyncio.timeout` keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, or TimeoutError once `seconds` have passed (None: no limit), as `asyncio.wait_for`; a
    cancellation of the waiting task always propagates."""
    async with asyncio.timeout(seconds):
        return await awaitable
