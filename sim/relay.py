"""A per-device TCP relay between a simulated device and the broker, so a network partition can be simulated:
`pause()` stops forwarding in both directions while keeping both sockets open (no FIN, no RST), exactly what a cut
cable looks like; the broker notices only when the keepalive runs out. `resume()` heals the link."""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    def __init__(self, broker_host: str, broker_port: int) -> None:
        self.broker_host, self.broker_port = broker_host, broker_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.base_events.Server | None = None

    @property
    def partitioned(self) -> bool:
        return not self._open.is_set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(self.broker_host, self.broker_port)
        except OSError:
            client_w.close()
            return

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    await self._open.wait()  # partitioned: hold the bytes, keep the socket open
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        await asyncio.gather(pump(client_r, broker_w), pump(broker_r, client_w))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
