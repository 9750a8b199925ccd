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


@pytest.mark.parametrize("what_it_does", ["returns", "raises"])
def test_the_waiting_task_ends_cancelled_whatever_the_awaited_code_does_with_it(what_it_does: str) -> None:
    """A step that catches its cancellation and returns, or whose cleanup turns it into an error, is cancelled all
    the same (as `asyncio.wait_for` had it, which ran the awaited code in a task of its own)."""

    async def step() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if what_it_does == "raises":
                raise ConnectionError("could not close the device handle") from None
            return "partial"
        return "done"

    async def main() -> None:
        task = asyncio.create_task(within(30, step()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_timeout_inside_a_task_already_being_cancelled_is_a_timeout() -> None:
    """Cleanup after a cancellation may wait with a bound of its own: that bound running out is a TimeoutError, and
    a normal end is a normal end (the earlier request is not counted against it)."""

    async def main() -> tuple[str, str]:
        outcomes = []
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            try:
                await within(0.01, asyncio.Event().wait())
            except TimeoutError:
                outcomes.append("timed out")
            outcomes.append(await within(5, asyncio.sleep(0, "ended")))
        return outcomes[0], outcomes[1]

    async def run() -> tuple[str, str]:
        task = asyncio.create_task(main())
        await asyncio.sleep(0.01)
        task.cancel()
        return await task

    assert asyncio.run(run()) == ("timed out", "ended")
