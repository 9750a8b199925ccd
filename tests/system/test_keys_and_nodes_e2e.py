"""Operator keys and nodes end to end, through the real CLI: Mosquitto, a real hub process, real agent processes.

Re-keying a node, the hub key rotation with a device connected throughout, the API token's overlap, `nodes accept
--all`, label selectors, `nodes delete`, and a command the hub's log suggests, run verbatim. Evidence comes from the
CLI's own output and exit codes, the wire (the retained hub state, read with an independent MQTT connection), the
hub's registry file and the processes' logs. Every wait is bounded; overlaps are seconds long, set by flags.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from protocols import HubState, Topic, kid_for, open_envelope
from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.wire import Observer
from tests.cli import fleetflow, ok

FLEET = "keys"
BIN = Path(sys.executable).parent
ONE_STEP = "name: one\nversion: 1.0.0\nsteps:\n  - id: a\n    uses: echo\n    with: {v: 1}\n"


def registry(hub: HubProcess) -> dict[str, dict[str, Any]]:
    """The hub's registry file, as a person would read it."""
    raw = json.loads((hub.data / "nodes.json").read_text())
    return {d["id"]: d for d in raw.get("nodes", {}).values()}


def liveness(hub: HubProcess, node: str) -> str | None:
    return next((n["liveness"] for n in hub.get("/nodes") if n["id"] == node), None)


def node_key(data: Path) -> str:
    """A device's public key, made the way an operator would before the agent first starts."""
    return str(json.loads(ok("keys", "new", str(data / "node.key"), "--json"))["public_key"])


def run_one(hub: HubProcess, timeout: float = 30) -> dict[str, Any]:
    return hub.wait_run(hub.submit(ONE_STEP), timeout)


def test_a_re_keyed_node_is_online_at_its_next_connect_without_a_hub_restart(mosquitto: Broker,
                                                                             tmp_path: Path) -> None:
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=()).start()
    old = new = None
    try:
        old_data, new_data = tmp_path / "old" / "data", tmp_path / "new" / "data"
        ok("nodes", "add", "n1", node_key(old_data), "--data", str(hub.data))
        old = AgentProcess(mosquitto, FLEET, "n1", old_data, hub.public_key, ("--heartbeat", "0.5")).start()
        hub.wait(lambda: liveness(hub, "n1") == "online", 20, "n1 online")
        old.stop()  # a power cut, and the device boots again: the hub now holds boot 2 of n1
        old.start()
        hub.wait(lambda: "connected as n1 boot 2" in old.log(), 20, "the old device's second boot")
        assert run_one(hub)["state"] == "succeeded"

        # The device is replaced: revoke, a new key on the new device (a fresh install, boot 1), add the new key.
        ok("nodes", "revoke", "n1", "--data", str(hub.data))
        old.stop()
        new_key = node_key(new_data)
        ok("nodes", "add", "n1", new_key, "--data", str(hub.data))
        new = AgentProcess(mosquitto, FLEET, "n1", new_data, hub.public_key, ("--heartbeat", "0.5")).start()
        hub.wait(lambda: liveness(hub, "n1") == "online", 30, "the re-keyed n1 online")
        assert "connected as n1 boot 1" in new.log()
        assert registry(hub)["n1"]["key"] == new_key and registry(hub)["n1"]["state"] == "accepted"
        run = run_one(hub)
        assert run["state"] == "succeeded" and run["steps"][0]["attempts"][-1]["node"] == "n1"
        assert hub.proc is not None and hub.proc.poll() is None  # the same hub process throughout
        # adding yet another key over the working node is refused, and changes nothing
        refused = fleetflow("nodes", "add", "n1", "ab" * 32, "--data", str(hub.data))
        assert refused.returncode == 1 and "revoke it first" in refused.stderr, refused.stderr
        assert registry(hub)["n1"]["key"] == new_key
    finally:
        for agent in (old, new):
            if agent is not None:
                agent.stop()
        hub.stop()


def test_hub_key_rotation_keeps_a_connected_device_working_and_it_restarts_with_its_old_hub_key(
        mosquitto: Broker, tmp_path: Path) -> None:
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub").start()
    old_key = hub.public_key
    observer = Observer(mosquitto, Topic.hub_state(FLEET).value)
    try:
        agent = hub.agent("n1")  # configured with the current key only
        hub.wait_nodes(1)
        assert run_one(hub)["state"] == "succeeded"
        rotation = json.loads(ok("hub", "rotate-key", "--data", str(hub.data), "--overlap", "4s", "--json"))
        next_key, next_kid = rotation["next_key"], rotation["next_kid"]
        assert next_kid == kid_for(bytes.fromhex(next_key)).hex()
        hub.wait(lambda: "announced the next hub key" in hub.log(), 20, "the hub announcing the next key")
        assert run_one(hub)["state"] == "succeeded"  # during the overlap: still the old key
        hub.wait(lambda: "switched to the next hub key" in hub.log(), 30, "the hub switching keys")
        assert run_one(hub)["state"] == "succeeded"  # commands signed with the new key are obeyed
        assert agent.log().count("connected as n1") == 1  # connected throughout: no reconnect, no restart
        assert f"announced its next key kid {next_kid}" in agent.log()
        hub.wait(lambda: f"the hub switched to its next key kid {next_kid}" in agent.log(), 20, "the agent following")
        assert json.loads((agent.data / "identity.json").read_text())["identity"]["1"]["hub_key"] == next_key

        # On the wire: the retained hub state announced the next key signed by the old one, then is signed by the new.
        topic = Topic.hub_state(FLEET).value
        states = [(k, open_envelope(p, topic, bytes.fromhex(k)).body) for p in observer.on("/hub/state")
                  for k in (old_key, next_key) if _signed_by(p, k)]
        assert any(k == old_key and isinstance(s, HubState) and s.next_key == bytes.fromhex(next_key)
                   for k, s in states)
        signer, last = states[-1]
        assert signer == next_key and isinstance(last, HubState) and last.key.hex() == next_key
        assert last.next_key is None

        # The switch log line suggests a command: it runs as printed and shows the new key.
        line = next(x for x in hub.log().splitlines() if "switched to the next hub key" in x)
        shown = _run_verbatim(line.split("; ", 1)[1].rsplit(" prints", 1)[0], tmp_path)
        assert next_key in shown

        # The device restarts with only its old configured --hub-key and keeps working.
        agent.stop()
        agent.start()
        hub.wait(lambda: agent.log().count("connected as n1") == 2 and liveness(hub, "n1") == "online", 30,
                 "n1 back after its restart")
        assert run_one(hub)["state"] == "succeeded"
        assert agent.hub_key == old_key and "was rotated" in agent.log()
    finally:
        observer.close()
        hub.stop()


def _signed_by(payload: bytes, key_hex: str) -> bool:
    try:
        open_envelope(payload, Topic.hub_state(FLEET).value, bytes.fromhex(key_hex))
        return True
    except Exception:
        return False


def _run_verbatim(command: str, cwd: Path) -> str:
    """A command copied from a log line, run as printed (with `fleetflow` on the PATH, from another directory)."""
    argv = shlex.split(command)
    assert argv[0] == "fleetflow", command
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
    assert out.returncode == 0, (command, out.stdout, out.stderr)
    return out.stdout


def test_api_token_rotation_keeps_the_old_token_during_the_overlap_only(mosquitto: Broker, tmp_path: Path) -> None:
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub").start()
    try:
        old = tmp_path / "old.token"
        old.write_text(hub.token + "\n")
        old.chmod(0o600)
        client = ("--hub", hub.url, "--token-file", str(old))
        ok("run", "list", *client)
        out = ok("hub", "rotate-token", "--data", str(hub.data), "--overlap", "10s")
        assert "accepted until" in out and old.read_text().strip() not in out
        new = hub.token
        assert new != old.read_text().strip()

        def status(token: str) -> int:
            return httpx.get(hub.url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code

        assert status(old.read_text().strip()) == 200 and status(new) == 200  # both during the overlap
        ok("run", "list", *client)
        ok("run", "list", "--data", str(hub.data))  # --data reads the new token
        hub.wait(lambda: status(old.read_text().strip()) == 401, 30, "the old token refused after the overlap")
        refused = fleetflow("run", "list", *client)
        assert refused.returncode == 2 and "401" in refused.stderr, refused.stderr
        assert status(new) == 200
        ok("run", "list", "--data", str(hub.data))
    finally:
        hub.stop()


def test_accept_all_takes_only_pending_nodes_and_label_selectors_filter(mosquitto: Broker, tmp_path: Path) -> None:
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub", args=()).start()
    try:
        labels = {"p1": ("site=a", "line=1"), "p2": ("site=a", "line=2"), "r1": ("site=a",), "v1": ("site=a",)}
        agents = {n: hub.agent(n, *[a for label in ls for a in ("--label", label)]) for n, ls in labels.items()}
        hub.wait(lambda: sum(1 for n in hub.get("/nodes") if n["enrollment"] == "pending") == 4, 30, "4 pending")
        # The fingerprint the device shows (`agent identity`) is the one the hub lists for the pending request.
        kids = {n: json.loads(ok("agent", "identity", "--data", str(a.data), "--json"))["kid"]
                for n, a in agents.items()}
        assert kids == {n: kid_for(bytes.fromhex((a.data / "node.key.pub").read_text().strip())).hex()
                        for n, a in agents.items()}
        pending = json.loads(ok("nodes", "list", "--json", "--data", str(hub.data)))
        assert {n["id"]: (n["enrollment"], n["kid"]) for n in pending} == {n: ("pending", k) for n, k in kids.items()}
        assert all(f"node {n} asks to enroll with kid {k}" in hub.log() for n, k in kids.items())
        ok("nodes", "reject", "r1", "--data", str(hub.data))
        ok("nodes", "accept", "v1", "--kid", kids["v1"], "--data", str(hub.data))
        ok("nodes", "revoke", "v1", "--data", str(hub.data))

        out = ok("nodes", "accept", "--all", "--data", str(hub.data))
        assert sorted(out.splitlines()) == [f"p1: accepted (kid {kids['p1']})", f"p2: accepted (kid {kids['p2']})"]
        states = {n: d["state"] for n, d in registry(hub).items()}
        assert states == {"p1": "accepted", "p2": "accepted", "r1": "rejected", "v1": "revoked"}
        hub.wait(lambda: {liveness(hub, "p1"), liveness(hub, "p2")} == {"online"}, 30, "p1 and p2 online")
        assert ok("nodes", "accept", "--all", "--data", str(hub.data)).strip() == "no pending nodes"

        def selected(*selectors: str) -> set[str]:
            args = [a for s in selectors for a in ("-l", s)]
            return {n["id"] for n in json.loads(ok("nodes", "list", "--json", "--data", str(hub.data), *args))}

        assert selected("site=a") == {"p1", "p2", "r1", "v1"}
        assert selected("site=a", "line=2") == {"p2"}
        assert selected("site=b") == set()
        bad = fleetflow("nodes", "list", "-l", "site", "--data", str(hub.data))
        assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    finally:
        hub.stop()


def test_delete_is_refused_while_online_unless_forced_and_forgets_the_node(mosquitto: Broker, tmp_path: Path) -> None:
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub").start()
    try:
        n1, n2 = hub.agent("n1"), hub.agent("n2")
        hub.wait_nodes(2)
        refused = fleetflow("nodes", "delete", "n1", "--data", str(hub.data))
        assert refused.returncode == 1 and "n1 is online" in refused.stderr and "--force" in refused.stderr
        assert "n1" in registry(hub) and liveness(hub, "n1") == "online"  # nothing changed
        n1.stop()  # power cut: the Last Will fails it
        hub.wait(lambda: liveness(hub, "n1") == "failed", 20, "n1 failed")
        assert ok("nodes", "delete", "n1", "--data", str(hub.data)).strip() == "n1: deleted"
        assert "n1" not in registry(hub) and liveness(hub, "n1") is None
        missing = fleetflow("nodes", "show", "n1", "--data", str(hub.data))
        assert missing.returncode == 1 and "404" in missing.stderr

        before = hub.metric('fleetflow_rejected_total{reason="unknown-key"}')
        assert ok("nodes", "delete", "n2", "--force", "--data", str(hub.data)).strip() == "n2: deleted"
        assert "n2" not in registry(hub) and liveness(hub, "n2") is None
        hub.wait(lambda: hub.metric('fleetflow_rejected_total{reason="unknown-key"}') > before, 20,
                 "n2's heartbeats refused")
        assert liveness(hub, "n2") is None  # its messages bring nothing back
        assert n2.proc is not None and n2.proc.poll() is None
    finally:
        hub.stop()


def test_the_command_the_pending_node_line_suggests_runs_verbatim(mosquitto: Broker, tmp_path: Path) -> None:
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub data", args=()).start()  # a path that needs quoting
    try:
        hub.agent("n1")
        line = hub.wait(lambda: next((x for x in hub.log().splitlines() if re.search(r"node n1 asks.*accept with: ",
                                                                                     x)), None),
                        20, "the pending line")
        command = line.split("accept with: ", 1)[1]
        out = _run_verbatim(command, tmp_path)
        assert out.startswith("n1: accepted")
        hub.wait(lambda: liveness(hub, "n1") == "online", 20, "n1 online")
    finally:
        hub.stop()
