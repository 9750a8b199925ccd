"""The dashboard in a real browser, for tests, the bench and the screenshots: Debian's Chromium (`apt-get install
chromium`; .ci/run installs it) driven by Playwright, which is pointed at it and never downloads a browser of its own.
Also a TCP proxy whose connections a test can cut, to see the live stream resume."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.brokers import HOST

CHROMIUM = Path("/usr/bin/chromium")
BOUND_MS = 60_000  # what a page is given to show something, on a busy machine


def launch(playwright: Any) -> Any:
    """Headless Chromium from the system package."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)


def log_in(page: Any, url: str, token: str, bound_ms: int = BOUND_MS) -> None:
    """Open the dashboard at `url`, log in with `token`, and wait until the live stream is connected."""
    page.goto(f"{url}/ui")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    wait_live(page, bound_ms)


# Predicates are passed as functions ("() => ..."): Playwright evaluates a bare expression with eval, which the
# dashboard's Content-Security-Policy refuses.
def wait_live(page: Any, bound_ms: int = BOUND_MS) -> None:
    page.wait_for_function("() => document.getElementById('live').getAttribute('data-state') === 'live'",
                           timeout=bound_ms)


def row_text(page: Any, node_id: str, column: int) -> str | None:
    """The text of one cell (0: node, 1: liveness, 2: health, ...) of a node's fleet row, or None if not shown."""
    return page.evaluate("([id, col]) => { const row = [...document.querySelectorAll('#fleet tbody tr')]"
                         ".find(r => r.getAttribute('data-node') === id);"
                         " return row ? row.children[col].textContent : null; }", [node_id, column])


@dataclass
class CuttableProxy:
    """A TCP proxy to `target_port` on 127.0.0.1. `cut()` closes every connection through it and refuses new ones
    until `resume()`; the head of every request that passed is kept (`requests`), to see what a client asked."""

    target_port: int
    requests: list[str] = field(default_factory=list)
    refusing: bool = False
    _live: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None

    def start(self) -> CuttableProxy:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()
        return self

    @property
    def url(self) -> str:
        assert self._listener is not None
        return f"http://{HOST}:{self._listener.getsockname()[1]}"

    def cut(self) -> None:
        with self._lock:
            self.refusing = True
            for sock in self._live:
                _close(sock)
            self._live.clear()

    def resume(self) -> None:
        with self._lock:
            self.refusing = False

    def stop(self) -> None:
        self.cut()
        if self._listener is not None:
            _close(self._listener)
            self._listener = None

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                if self.refusing:
                    _close(client)
                    continue
                try:
                    upstream = socket.create_connection((HOST, self.target_port), timeout=10)
                except OSError:
                    _close(client)
                    continue
                upstream.settimeout(None)
                self._live.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        pending = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if requests:  # request heads, one per request on a kept-alive connection
                    pending += data
                    while b"\r\n\r\n" in pending:
                        head, _, pending = pending.partition(b"\r\n\r\n")
                        self.requests.append(head.decode("latin-1"))
                        pending = b""  # a body (small, JSON) is not a head: dropped from the record
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
            with self._lock:
                self._live.discard(source)
                self._live.discard(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
