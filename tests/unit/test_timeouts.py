"""`within`, the agent's bounded wait (agent/runtime/timeouts.py): a result, a timeout, and a cancellation that
arrives as the awaited thing completes, which Python 3.11's `asyncio.wait_for` loses."""

from __future__ import annotations

import asyncio

import pytest

from agent.runtime.timeouts import within


def test_the_result_or_a_timeout() -> None:
    async def main() -> None:
        assert await within(5, asyncio.sleep(0, "done")) == "done"
        assert await within(None, asyncio.sleep(0, "unbounded")) == "unbounded"
        with pytest.raises(TimeoutError):
            await within(0.01, asyncio.Event().wait())

    asyncio.run(main())


def test_a_cancellation_that_arrives_as_the_wait_ends_is_kept() -> None:
    """The event is set and the waiting task cancelled in one loop iteration (a simulated power cut landing as a
    device's awaited event fires): the task must end cancelled, never go on as if nothing happened."""

    async def main() -> None:
        event = asyncio.Event()

        async def device() -> str:
            await within(10, event.wait())
            return "went on"

        task = asyncio.create_task(device())
        for _ in range(3):
            await asyncio.sleep(0)  # the task is waiting on the event
        event.set()
        assert task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
