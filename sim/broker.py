"""The demo's embedded amqtt broker, in a child process the demo owns: a broker restart is then what a real one is (the
process dies, every socket breaks, nothing is said goodbye), and no broker bug can block the demo's own event loop.

Why not in the demo's process, as before: amqtt 0.12's `Broker.shutdown()` hung 3 runs in 5 (under load). It stops
each client's handler one by one and waits for its reader task to end; on Python 3.11, `asyncio.wait_for` drops a
cancellation that arrives as the read it wraps completes, so a busy client's reader keeps reading and the shutdown
never returns. Killing the process needs no cooperation from the broker.

The broker itself is the hub's embedded one (hub/embedded_broker.py, with its workaround for amqtt's subscription
table).

`python -m sim.broker mqtt://HOST:PORT` runs the child: it prints `ready` once listening and exits when its stdin
closes (the demo is gone) or on SIGTERM/SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from agent.runtime.timeouts import within

READY = "ready"
START_S = 20.0   # the child listens within this, or the demo fails saying so
STOP_S = 5.0     # a killed child is reaped within this


async def _serve(url: str) -> None:
    from hub.embedded_broker import start_embedded_broker

    await start_embedded_broker(url)
    print(READY, flush=True)
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    # The demo holds our stdin: when it goes away, however it went, so do we.
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: closed.set() if not os.read(stdin, 4096) else None)
    loop.add_signal_handler(signal.SIGTERM, closed.set)
    await closed.wait()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(sys.argv[1]))


class EmbeddedBroker:
    """The amqtt broker of `fleetflow demo`: `start`, `restart(down_s)` (kill -9, down for `down_s`, start again),
    `stop`. Every wait is bounded; the child's log goes to `log`."""

    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sim.broker", self.url, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        try:
            line = await within(START_S, self.proc.stdout.readline())
        except TimeoutError:
            line = b""
        if line.strip().decode() != READY:
            await self.stop()
            raise TimeoutError(f"the embedded broker did not start listening on {self.url} within {START_S:g} s "
                               f"(its log: {self.log})")

    async def restart(self, down_s: float) -> None:
        await self._kill()
        await asyncio.sleep(down_s)
        await self.start()
        self.restarts += 1

    async def stop(self) -> None:
        await self._kill()

    async def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            await within(STOP_S, proc.wait())
        except TimeoutError:
            logging.getLogger("fleetflow.demo").warning("the embedded broker (pid %d) was not reaped within %g s",
                                                        proc.pid, STOP_S)
        if proc.stdin is not None:
            proc.stdin.close()


if __name__ == "__main__":
    main()
