"""One request never stalls the hub: a real `fleetflow hub run`, Mosquitto and a heartbeating agent, while the API is
sent billion laughs, 50 MB bodies (chunked and sized), 100,000 steps and 5,000-deep nesting. Each is refused (413 or
422, naming the limit) in well under a second, and the agent stays online throughout. Also: no public docs, a port
in use and an API token others can read each stop the start with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.brokers import Broker
from tests.hubprocess import HubProcess

REFUSED_WITHIN_S = 5.0  # a liveness check, not a benchmark: refusals take milliseconds, the stalls took 4 to 188 s
START_TIMEOUT_S = 30.0
FLEETFLOW = str(Path(sys.executable).parent / "fleetflow")
BIG = 50 * 1024 * 1024

OK = """
name: small
version: 1.0.0
steps:
  - id: a
    uses: echo
    with: {v: 1}
"""


def billion_laughs(levels: int) -> str:
    lines = ["name: lol", "steps:", "  - id: a", "    uses: echo", "    with:",
             "      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def fifty_megabytes() -> Iterator[bytes]:
    """A JSON body that never ends soon, streamed: httpx sends a generator chunked, with no Content-Length."""
    yield b'{"workflow": "'
    for _ in range(BIG // 65536):
        yield b"a" * 65536
    yield b'"}'


@pytest.fixture
def hub(mosquitto: Broker, tmp_path: Path) -> Iterator[HubProcess]:
    with HubProcess(mosquitto, "limits", tmp_path / "hub") as process:
        yield process


def test_costly_requests_are_refused_fast_while_the_agent_stays_online(hub: HubProcess) -> None:
    hub.agent("n1")
    hub.wait_nodes(1)
    online_since = hub.get("/nodes/n1")["changed_at"]
    url, auth = hub.url + "/runs", {"Authorization": f"Bearer {hub.token}"}
    steps_yaml = "name: big\nsteps:\n" + "".join(f"  - {{id: s{i}, uses: echo}}\n" for i in range(100_000))
    json_headers = {**auth, "Content-Type": "application/json"}
    cases: list[tuple[str, Callable[[], httpx.Response], int, str]] = [
        ("billion laughs, 9 levels", lambda: httpx.post(url, json={"workflow": billion_laughs(9)}, headers=auth,
                                                         timeout=30), 422, "(--max-workflow-nodes)"),
        ("50 MB chunked", lambda: httpx.post(url, content=fifty_megabytes(), headers=json_headers, timeout=30), 413,
         "request body: more than 1048576 bytes, over the limit of 1048576 (--max-request-bytes)"),
        ("50 MB with Content-Length", lambda: httpx.post(url, content=b"x" * BIG, headers=json_headers, timeout=30),
         413, f"request body: {BIG} bytes, over the limit of 1048576 (--max-request-bytes)"),
        ("100k steps of YAML", lambda: httpx.post(url, json={"workflow": steps_yaml}, headers=auth, timeout=30), 413,
         "(--max-request-bytes)"),
        ("100k steps as an object", lambda: httpx.post(url, json={"workflow": {"name": "big", "steps": [{}] * 100_000}},
                                                       headers=auth, timeout=30),
         422, "workflow: 100000 steps, over the limit of 1000 (--max-workflow-steps)"),
        ("100k steps in 200 KB of YAML", lambda: httpx.post(url, json={"workflow": "name: big\nsteps: ["
                                                                       + ",".join(["a"] * 100_000) + "]\n"},
                                                            headers=auth, timeout=30),
         422, "workflow:2: 100000 steps, over the limit of 1000 (--max-workflow-steps)"),
        ("5,000-deep nesting", lambda: httpx.post(url, json={"workflow": "name: x\nsteps: " + "[" * 5000 + "]" * 5000},
                                                  headers=auth, timeout=30), 422, "(--max-workflow-depth)"),
    ]
    for what, send, status, says in cases:
        started = time.monotonic()
        response = send()
        took = time.monotonic() - started
        assert response.status_code == status, (what, response.status_code, response.text[:300])
        assert says in response.json()["detail"], (what, response.json())
        assert took < REFUSED_WITHIN_S, f"{what}: refused after {took:.1f} s"
        node = hub.get("/nodes/n1")
        assert (node["liveness"], node["changed_at"]) == ("online", online_since), (what, node.get("history"))
    # The hub still works: a small workflow runs on the agent that kept heartbeating.
    run = hub.wait_run(hub.submit(OK))
    assert run["state"] == "succeeded", run


def test_docs_are_not_public_and_the_schema_needs_the_token(hub: HubProcess) -> None:
    for path in ("/docs", "/redoc"):
        assert httpx.get(hub.url + path, timeout=10).status_code == 404
    assert httpx.get(hub.url + "/openapi.json", timeout=10).status_code == 401
    schema = hub.get("/openapi.json")
    assert "/runs" in schema["paths"]
    assert f"API listening at {hub.url}" in hub.log()


def hub_run(broker: Broker, data: Path, api: str) -> subprocess.CompletedProcess[str]:
    """`fleetflow hub run` expected to stop by itself; a hub that keeps running fails the test at the timeout."""
    try:
        return subprocess.run([FLEETFLOW, "hub", "run", "--broker", broker.url, "--fleet", "limits", "--data",
                               str(data), "--api", api], capture_output=True, text=True, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the hub was still running after {START_TIMEOUT_S} s") from None


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def test_an_api_port_in_use_stops_the_start(mosquitto: Broker, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = hub_run(mosquitto, tmp_path / "hub", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert error_lines(done) == [f"error: cannot listen on 127.0.0.1:{port} (--api): address already in use"]


def test_an_api_token_others_can_read_stops_the_start(mosquitto: Broker, tmp_path: Path) -> None:
    data = tmp_path / "hub"
    data.mkdir()
    token = data / "api.token"
    token.write_text("t" * 43 + "\n")
    os.chmod(token, 0o644)
    done = hub_run(mosquitto, data, "127.0.0.1:0")
    assert done.returncode == 2
    assert error_lines(done) == [f"error: API token file {token} is accessible by other users (mode 644); run: "
                                 f"chmod 600 {token}"]
    os.chmod(token, 0o600)  # what the message says to do is enough
    process = HubProcess(mosquitto, "limits", data).start()
    try:
        assert process.token == "t" * 43
    finally:
        process.stop()
