"""Artifacts end to end: a real hub process stores and serves them, a real agent process installs them through
workflows over a real Mosquitto, runs the installed version as a supervised service and probes its health; a
download cut mid-way resumes, a wrong hash and a bad manifest signature change nothing, rollback switches back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import nacl.signing

from protocols.manifest import FetchRequest, Manifest, seal_fetch, seal_manifest
from tests.brokers import Broker, free_port
from tests.cli import fleetflow, ok
from tests.hubprocess import HubProcess
from tests.httpserver import Served, http_server
from tests.waiting import wait

APP = """import http.server, sys
VERSION = "{version}"
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("demo " + VERSION).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""
ONCE = {"retry": {"max_attempts": 1}}


def workflow(name: str, steps: list[dict[str, Any]]) -> str:
    return json.dumps({"name": name, "version": "1.0.0", "steps": [{**ONCE, **s} for s in steps]})


def install(ref: str, **more: Any) -> dict[str, Any]:
    return {"id": "install", "uses": "artifact.install", "with": {"artifact": ref, **more},
            "compensate": {"uses": "artifact.rollback", "with": {"artifact": ref}}}


def restart_and_check(port: int, version: str, after: str = "install", attempts: int = 60) -> list[dict[str, Any]]:
    return [{"id": "restart", "uses": "service.restart", "with": {"service": "demo", "settle": 0.5},
             "needs": [after]},
            {"id": "check", "uses": "health.check", "needs": ["restart"],
             "with": {"http": f"http://127.0.0.1:{port}/health", "contains": f"demo {version}", "attempts": attempts,
                      "interval": 0.5, "timeout": 2, "within": 60}}]


def add(hub: HubProcess, tmp: Path, version: str, *more: str) -> dict[str, Any]:
    source = tmp / f"app-{version}" / "app.py"
    source.parent.mkdir()
    source.write_text(APP.format(version=version))
    return json.loads(ok("artifacts", "add", source, "--name", "demo", "--version", version, "--data", hub.data,
                         "--json", *more))


def run_of(hub: HubProcess, text: str) -> dict[str, Any]:
    return hub.wait_run(hub.submit(text), 120)


def health(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).text
    except httpx.HTTPError:
        return ""


def steps(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in run["steps"]}


def test_install_restart_probe_resume_refuse_and_roll_back(mosquitto: Broker, tmp_path: Path) -> None:
    port = free_port()
    # This test fails steps on purpose and the machine may be busy: neither is what it is about, so the node's
    # breaker needs many failures and its telemetry reports a calm machine.
    policy, calm = tmp_path / "policy.yaml", tmp_path / "telemetry.json"
    policy.write_text("breaker: {failures: 100, window: 60, cooldown: 1, successes: 1}\n")
    calm.write_text(json.dumps({"cpu": 5, "mem": 10, "disk": 10, "temp": 40}))
    with HubProcess(mosquitto, "f-art", tmp_path / "hub", args=("--auto-accept", "--policy", str(policy))) as hub:
        config = tmp_path / "agent.toml"
        config.write_text(f'[artifacts]\nenabled = true\nhub_url = "{hub.url}"\n'
                          f'[service]\nenabled = true\nsupervise = ["demo = {sys.executable} app.py {port}"]\n'
                          f'[health]\nenabled = true\nallow = ["http://127.0.0.1:*"]\n')
        # Every step here runs once (ONCE): a node failed for a stall of a busy machine (3 heartbeats missed; the
        # tests' 0.5 s makes that 1.5 s) would fail the run, so this agent beats every 2 s.
        agent = hub.agent("n1", "--config", str(config), "--telemetry-file", str(calm), "--heartbeat", "2")
        hub.wait_nodes(1, 60)
        slots = agent.data / "artifacts" / "demo"
        pidfile = agent.data / "services" / "demo.pid"

        def supervised_pid() -> int:
            return int(json.loads(pidfile.read_text())["pid"])

        try:
            # bad input is refused before anything is sent
            missing = fleetflow("artifacts", "add", tmp_path / "nope.bin", "--name", "demo", "--version", "1.0.0",
                                "--data", hub.data)
            assert missing.returncode == 2 and "nope.bin: no such file" in missing.stderr

            v1 = add(hub, tmp_path, "1.0.0")
            run = run_of(hub, workflow("deploy", [install("demo@1.0.0"), *restart_and_check(port, "1.0.0")]))
            assert run["state"] == "succeeded", run
            assert os.readlink(slots / "current") == "1.0.0"
            assert steps(run)["install"]["output"]["version_before"] is None
            first_pid = supervised_pid()

            add(hub, tmp_path, "1.1.0")
            run = run_of(hub, workflow("deploy", [install("demo@1.1.0"), *restart_and_check(port, "1.1.0")]))
            assert run["state"] == "succeeded", run
            out = steps(run)["install"]["output"]
            assert (out["version_before"], out["version"]) == ("1.0.0", "1.1.0")
            assert (os.readlink(slots / "current"), os.readlink(slots / "previous")) == ("1.1.0", "1.0.0")
            assert steps(run)["restart"]["output"]["previous_pid"] == first_pid != supervised_pid()

            # supervised: a service that dies is started again
            crashed = supervised_pid()
            os.kill(crashed, signal.SIGKILL)
            wait(lambda: pidfile.exists() and supervised_pid() != crashed, 60, "the service started again")
            wait(lambda: health(port) == "demo 1.1.0", 60, "the service started again to answer")

            # a wrong hash: the hub's copy of the blob was changed on disk
            v2 = add(hub, tmp_path, "1.2.0")
            blob = hub.data / "artifacts" / "blobs" / v2["sha256"]
            blob.write_bytes(blob.read_bytes().replace(b"1.2.0", b"6.6.6"))
            run = run_of(hub, workflow("bad-hash", [install("demo@1.2.0")]))
            assert run["state"] == "failed"
            assert f"the manifest says {v2['sha256']}; nothing was installed or switched" in run["error"], run

            # a bad manifest signature: signed by another key, or with a changed byte
            stranger = nacl.signing.SigningKey.generate()
            forged = Manifest("demo", "1.3.0", v1["sha256"], v1["size"], "app.py", 1)
            genuine = bytes.fromhex(v1["manifest"])
            for signed, problem in ((seal_manifest(forged, stranger), "not a hub key this node trusts"),
                                    (genuine[:-1] + bytes([genuine[-1] ^ 1]), "signature does not verify")):
                run = run_of(hub, workflow("bad-sig", [{"id": "install", "uses": "artifact.install",
                                                        "with": {"manifest": signed.hex()}}]))
                assert run["state"] == "failed" and "manifest refused" in run["error"] and problem in run["error"]
            assert (os.readlink(slots / "current"), os.readlink(slots / "previous")) == ("1.1.0", "1.0.0")
            assert sorted(p.name for p in slots.iterdir()) == ["1.0.0", "1.1.0", "current", "previous"]

            # rollback switches back, and the service runs the version before
            run = run_of(hub, workflow("rollback", [{"id": "undo", "uses": "artifact.rollback",
                                                     "with": {"artifact": "demo@1.1.0"}},
                                                    *restart_and_check(port, "1.0.0", after="undo")]))
            assert run["state"] == "succeeded", run
            assert steps(run)["undo"]["output"] == {"artifact": "demo", "version_before": "1.1.0",
                                                    "version": "1.0.0", "changed": True}
            assert os.readlink(slots / "current") == "1.0.0"

            # an interrupted download resumes: the manifest's mirror drops the first answer after 100 bytes
            app = APP.format(version="1.4.0").encode()
            served = Served(files={"/demo.py": app}, cut_after={"/demo.py": 100})
            with http_server(served) as mirror:
                add(hub, tmp_path, "1.4.0", "--url", f"{mirror}/demo.py")
                run = run_of(hub, workflow("resume", [install("demo@1.4.0"),
                                                      *restart_and_check(port, "1.4.0")]))
            assert run["state"] == "succeeded", run
            assert served.ranges("/demo.py") == [None, "bytes=100-"]
            assert steps(run)["install"]["output"]["resumed_at"] == [100]
            assert os.readlink(slots / "current") == "1.4.0"

            # a failed update is compensated (saga): the probe cannot pass, artifact.rollback switches back
            run = run_of(hub, workflow("saga", [install("demo@1.1.0"),
                                                *restart_and_check(port, "9.9.9", attempts=2)]))
            assert run["state"] == "failed" and steps(run)["undo-install"]["state"] == "succeeded", run
            assert os.readlink(slots / "current") == "1.4.0"

            # who may download a blob: token holders and accepted nodes, by a request signed with the node's key
            url = f"{hub.url}/artifacts/{v1['sha256']}"
            assert httpx.get(url, timeout=10).status_code == 401
            part = httpx.get(url, headers={"Authorization": f"Bearer {hub.token}", "Range": "bytes=10-"}, timeout=10)
            assert part.status_code == 206 and part.content == APP.format(version="1.0.0").encode()[10:]
            node_key = nacl.signing.SigningKey(bytes.fromhex((agent.data / "node.key").read_text().strip()))
            for key, node, sha, status in ((node_key, "n1", v1["sha256"], 200), (stranger, "n1", v1["sha256"], 401),
                                           (node_key, "n1", v2["sha256"], 401), (node_key, "n2", v1["sha256"], 401)):
                proof = seal_fetch(FetchRequest("f-art", node, sha), key).hex()
                answer = httpx.get(url, headers={"Authorization": f"FleetflowNode {proof}"}, timeout=10)
                assert answer.status_code == status, (node, sha, answer.text)
        finally:
            if pidfile.exists():  # the supervised service outlives the agent by design
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(supervised_pid(), signal.SIGKILL)
