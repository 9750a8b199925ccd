"""Bounded waits that keep a cancellation.

On Python 3.11, `asyncio.wait_for` returns normally when its task is cancelled in the same loop iteration as the
thing it waits for completes: the cancellation is lost. A power-cut device (the simulator cancels its agent, sim/
worker.py) then went on running with its connection reset, reconnected in the boot the hub had already buried, and
its outbox never drained (a 5,000-device run: 49 of 50 power cuts landed). `asyncio.timeout` keeps it.

`wait_for` also ran what it waited for in a task of its own, so whatever that code did with its cancellation, the
waiting task ended cancelled. `within` runs it in the waiting task itself and keeps that promise by counting the
task's cancellation requests: a step that catches its cancellation and returns, or turns it into an error, still
ends cancelled (agent/runner.py reports such an attempt as cancelled, never as a result).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, or TimeoutError once `seconds` have passed (None: no limit), as `asyncio.wait_for`; a
    cancellation of the waiting task always propagates, whatever the awaited code does with it."""
    task = asyncio.current_task()
    asked = task.cancelling() if task is not None else 0  # requests already pending when the wait began
    try:
        async with asyncio.timeout(seconds):  # its own expiry is withdrawn (uncancel) before TimeoutError
            result = await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if task is not None and task.cancelling() > asked:
            raise asyncio.CancelledError() from exc  # the awaited code turned our cancellation into an error
        raise
    if task is not None and task.cancelling() > asked:
        raise asyncio.CancelledError()  # the awaited code caught our cancellation and returned
    return result
