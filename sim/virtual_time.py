"""An asyncio event loop on virtual time, for the deterministic simulation (sim/dst.py).

When nothing is ready, the selector does not wait: it moves the loop's clock to the next timer. Sleeps cost no wall
time, and time is exactly reproducible. Threads would break both (their timing is the machine's), so the default
executor runs a function at once, on the loop's thread; code that must not use threads (the hub's journal writer)
is told so by its own option.

Virtual time moves only when nothing is ready. A task that never waits for time (a loop on `sleep(0)`, a busy poll)
would keep it still forever and hang its caller: after STILL_TURNS turns of the loop at one instant, the loop raises
`SimulationStalled` naming the tasks that were ready, so a seed fails instead of hanging.

Tasks can be owned: a task made while `OWNER` holds an `Owner` (directly or inherited through the context) is
counted in it, so a simulation can cancel everything one simulated process runs, as a crash ends a process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import selectors
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from protocols import FleetflowError

T = TypeVar("T")
STALL_WAIT_S = 1.0  # nothing scheduled at all: only another thread could still wake the loop (there should be none)
STILL_TURNS = 100_000  # turns of the loop at one instant before it counts as stalled: a simulated world takes under
                       # 50 (bench/dst.py, seeds 1-8), and this many cost about a second of wall time


class SimulationStalled(FleetflowError, RuntimeError):
    """Nothing is ready and no timer is set: every task waits for something that can never come. Or time stands
    still: tasks keep the loop busy at one instant and never let it reach its next timer."""


@dataclass
class Owner:
    """The tasks of one simulated process (a hub or an agent instance)."""

    name: str
    tasks: dict[asyncio.Task[Any], None] = field(default_factory=dict)  # insertion-ordered, unlike a set

    def adopt(self, task: asyncio.Task[Any]) -> None:
        self.tasks[task] = None
        task.add_done_callback(lambda t: self.tasks.pop(t, None))


OWNER: contextvars.ContextVar[Owner | None] = contextvars.ContextVar("dst_owner", default=None)


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each function at once on the calling thread (`asyncio.to_thread` and `run_in_executor` included). A
    ThreadPoolExecutor only because asyncio accepts nothing else as the default executor: it never starts a thread."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, as a worker thread would
            future.set_exception(exc)
        return future


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, loop_clock: list[float], ready_tasks: Callable[[], list[str]]) -> None:
        super().__init__()
        self._clock = loop_clock
        self._ready_tasks = ready_tasks
        self._still = 0  # turns of the loop since the clock last moved

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            self._count_still_turn()
            return ready
        if timeout is None:
            ready = super().select(STALL_WAIT_S)
            if not ready:
                raise SimulationStalled("nothing is ready and no timer is set")
            self._count_still_turn()
            return ready
        self._still = 0
        self._clock[0] += timeout  # jump to the next timer instead of waiting for it
        return []

    def _count_still_turn(self) -> None:
        self._still += 1
        if self._still >= STILL_TURNS:
            self._still = 0  # the cleanup after this error (cancelling every task) takes turns of its own
            running = ", ".join(self._ready_tasks()) or "no task (callbacks only)"
            raise SimulationStalled(f"virtual time stood still at {self._clock[0]:.3f} s for {STILL_TURNS} turns of "
                                    f"the loop; ready: {running}")


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        self._virtual_now = [start]
        self.owners: weakref.WeakKeyDictionary[asyncio.Task[Any], Owner] = weakref.WeakKeyDictionary()
        super().__init__(_VirtualSelector(self._virtual_now, self._ready_tasks))
        self.set_default_executor(InlineExecutor())
        self.set_task_factory(_owned_task)  # type: ignore[arg-type]  # typeshed wants exactly (loop, coro)

    def time(self) -> float:
        return self._virtual_now[0]

    def _ready_tasks(self) -> list[str]:
        """The names of the tasks due to run in this turn: the ones keeping time still. asyncio has no public view of
        its ready queue; each entry's callback is a step or wake-up of its task, bound to it (`__self__`)."""
        names: dict[str, None] = {}
        for handle in getattr(self, "_ready", ()):
            task = getattr(getattr(handle, "_callback", None), "__self__", None)
            if isinstance(task, asyncio.Task):
                owner = self.owners.get(task)
                names[task.get_name() + (f" (of {owner.name})" if owner is not None else "")] = None
        return list(names)


def _owned_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Task[Any]:
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
    context = kwargs.get("context")
    owner = context.get(OWNER) if context is not None else OWNER.get()
    if owner is not None:
        owner.adopt(task)
        if isinstance(loop, VirtualTimeLoop):
            loop.owners[task] = owner
    return task


def spawn(owner: Owner, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """Start `coro` as a task of `owner`; every task it starts belongs to `owner` too."""
    token = OWNER.set(owner)
    try:
        return asyncio.get_running_loop().create_task(coro, name=name)
    finally:
        OWNER.reset(token)


async def kill(owner: Owner, rounds: int = 20) -> None:
    """Cancel every task of `owner`, and the ones their cleanup starts, and wait until none is left."""
    for _ in range(rounds):
        tasks = list(owner.tasks)
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(main: Coroutine[Any, Any, T], start: float = 0.0,
        on_error: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None] | None = None) -> T:
    """Run `main` to completion on a fresh virtual-time loop, then close it."""
    loop = VirtualTimeLoop(start)
    if on_error is not None:
        loop.set_exception_handler(on_error)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
