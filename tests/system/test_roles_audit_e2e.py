"""Token roles and the signed audit log end to end: a real hub process on Mosquitto, the real `fleetflow` CLI.

Every route of the API's table refuses a missing and a wrong token; a viewer cannot submit, an operator cannot
accept nodes or make tokens, an admin can; a revoked token is refused at once. The hub's audit log of all that
verifies, and `fleetflow audit verify` names an edited, removed, swapped or re-signed entry in copies of it. Hub key
and token rotations done with the CLI are audited, and entries signed before a key switch stay valid after it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

from hub.api import ROUTES, UNAUTHORIZED, Route
from hub.audit import entry_hash
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.cli import fleetflow, ok

FLEET = "roles"
ONE_STEP = "name: one\nversion: 1.0.0\nsteps:\n  - id: a\n    uses: echo\n    with: {v: 1}\n"


def refused(out: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    """A refusal: the exit code, and the API's message as one line on stderr."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert says in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker("mosquitto", tmp_path_factory.mktemp("broker")).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def shared_hub(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = HubProcess(broker, FLEET, tmp_path_factory.mktemp("routes") / "hub", args=()).start()
    try:
        yield hub
    finally:
        hub.stop()


def concrete(route: Route) -> str:
    return route.path.replace("{run_id}", "r-1").replace("{node_id}", "n1").replace("{name}", "ci")


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_every_route_refuses_a_missing_and_a_wrong_token(shared_hub: HubProcess, route: Route) -> None:
    url = shared_hub.url + concrete(route)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {shared_hub.token}"},
                    {"Authorization": f"Bearer {shared_hub.token}x"}):
        response = httpx.request(route.method, url, headers=headers, timeout=30)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"detail": UNAUTHORIZED}
        assert response.headers["www-authenticate"] == "Bearer"
    # the admin token gets past the role check of every route (to whatever the route then answers)
    response = httpx.request(route.method, url, headers={"Authorization": f"Bearer {shared_hub.token}"}, timeout=30)
    assert response.status_code not in (401, 403), response.text


def make_token(hub: HubProcess, name: str, role: str, where: Path) -> Path:
    made = json.loads(ok("token", "create", name, "--role", role, "--json", "--data", str(hub.data)))
    assert made["name"] == name and made["role"] == role and len(made["token"]) >= 40
    path = where / f"{name}.token"
    path.write_text(made["token"] + "\n")
    path.chmod(0o600)
    return path


def entries(data: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]


def test_roles_are_enforced_on_the_cli_a_revoked_token_is_refused_at_once_and_all_of_it_is_audited(
        broker: Broker, tmp_path: Path) -> None:
    hub = HubProcess(broker, FLEET, tmp_path / "hub", args=()).start()
    workflow = tmp_path / "one.yaml"
    workflow.write_text(ONE_STEP)
    try:
        viewer = make_token(hub, "dashboard", "viewer", tmp_path)
        operator = make_token(hub, "ops", "operator", tmp_path)

        def as_(token: Path, *args: str) -> subprocess.CompletedProcess[str]:
            return fleetflow(*args, "--hub", hub.url, "--token-file", str(token))

        # viewer: reads, and nothing else
        assert as_(viewer, "run", "list", "--json").returncode == 0
        refused(as_(viewer, "run", "submit", str(workflow)), 1,
                "token 'dashboard' has the role viewer; POST /runs needs operator or higher (HTTP 403)")
        refused(as_(viewer, "nodes", "drain", "n1"), 1, "needs operator")
        # operator: runs and drain, not nodes or tokens
        run_id = as_(operator, "run", "submit", str(workflow)).stdout.strip()
        assert run_id and hub.get(f"/runs/{run_id}")["id"] == run_id
        assert as_(operator, "run", "cancel", run_id, "--reason", "wrong inputs").returncode == 0
        refused(as_(operator, "nodes", "drain", "n1"), 1, "no node 'n1'")  # past the role check: no such node
        refused(as_(operator, "nodes", "accept", "n1", "--kid", "0" * 16), 1,
                "POST /nodes/{node_id}/accept needs admin")
        refused(as_(operator, "token", "create", "mine", "--role", "admin"), 1, "POST /tokens needs admin")
        refused(as_(operator, "token", "list"), 1, "GET /tokens needs admin")
        # admin: nodes and tokens
        node_key = bytes(SigningKey.generate().verify_key).hex()
        ok("nodes", "add", "n1", node_key, "--data", str(hub.data))
        listed = json.loads(ok("token", "list", "-o", "json", "--data", str(hub.data)))
        assert [(t["name"], t["role"]) for t in listed] == [("admin", "admin"), ("dashboard", "viewer"),
                                                            ("ops", "operator")]
        assert all(set(t) <= {"name", "role", "created_at", "created_by", "file"} for t in listed)  # no secret
        # a revoked token is refused from the very next request
        assert "revoked" in ok("token", "revoke", "ops", "--data", str(hub.data))
        refused(as_(operator, "run", "list"), 2, "missing or wrong bearer token")

        log = entries(hub.data)
        seen = {(e["who"], e["role"], e["action"], e["status"]) for e in log}
        assert ("admin", "admin", "token.create", 201) in seen
        assert ("ops", "operator", "run.submit", 201) in seen and ("ops", "operator", "run.cancel", 200) in seen
        assert ("dashboard", "viewer", "run.submit", 403) in seen and ("ops", "operator", "node.accept", 403) in seen
        assert ("admin", "admin", "node.add", 201) in seen and ("admin", "admin", "token.revoke", 200) in seen
        assert ("-", "-", "GET /runs", 401) in seen  # the revoked token's refusal
        submit = next(e for e in log if e["action"] == "run.submit" and e["status"] == 201)
        assert submit["target"] == run_id and submit["params"]["workflow"] == "one"
        assert submit["from"] == "127.0.0.1" and all(e["from"] == "127.0.0.1" for e in log)
        cancel = next(e for e in log if e["action"] == "run.cancel")
        assert cancel["params"] == {"reason": "wrong inputs"}
        for secret in (viewer.read_text().strip(), operator.read_text().strip(), hub.token):
            assert secret not in (hub.data / "audit.log").read_text()  # never a token in the log

        shown = ok("audit", "verify", "--data", str(hub.data))
        assert shown.startswith(f"audit log ok: {len(log)} entries") and shown.count("\n") == 1, shown
        table = ok("audit", "show", "--data", str(hub.data), "-n", "3")
        assert "token.revoke" in table and len(table.splitlines()) == 4

        assert_tampering_is_found(hub.data, tmp_path)
    finally:
        hub.stop()


def assert_tampering_is_found(data: Path, tmp_path: Path) -> None:
    """`audit verify` on copies of the data directory, each changed one way."""
    lines = (data / "audit.log").read_text().splitlines(keepends=True)
    assert len(lines) >= 6

    def edit(x: list[str]) -> None:
        x[2] = x[2].replace('"status":', '"status":1', 1)

    def remove(x: list[str]) -> None:
        del x[3]

    def swap(x: list[str]) -> None:
        x[1], x[2] = x[2], x[1]

    def resign(x: list[str]) -> None:
        other = SigningKey.generate()
        entry = json.loads(x[2])
        entry["who"], entry["kid"] = "admin", "ab" * 8
        entry["hash"] = entry_hash(entry)
        entry["sig"] = other.sign(b"fleetflow audit entry v1\n" + bytes.fromhex(entry["hash"])).signature.hex()
        x[2] = json.dumps(entry) + "\n"

    cases = {edit: "line 3 (seq 3): changed: its content does not match its hash",
             remove: "line 4 (seq 5): removed: seq 4 missing before it",
             swap: "line 2 (seq 3): reordered: seq 3 stands where seq 2 belongs",
             resign: "line 3 (seq 3): bad signature: signed by kid abababababababab"}
    for change, says in cases.items():
        copy = tmp_path / f"copy-{change.__name__}"
        copy.mkdir(mode=0o700)
        for name in ("hub.key", "audit.log", "audit.head"):
            shutil.copy2(data / name, copy / name)
        changed = list(lines)
        change(changed)
        (copy / "audit.log").write_text("".join(changed))
        out = fleetflow("audit", "verify", "--data", str(copy))
        refused(out, 1, says)


def test_cli_rotations_are_audited_and_entries_signed_before_a_key_switch_stay_valid(broker: Broker,
                                                                                   tmp_path: Path) -> None:
    hub = HubProcess(broker, FLEET, tmp_path / "hub", args=()).start()
    try:
        old_public = json.loads(ok("hub", "identity", "--data", str(hub.data), "--json"))["public_key"]
        make_token(hub, "before", "viewer", tmp_path)
        ok("hub", "rotate-token", "--data", str(hub.data), "--overlap", "0")
        rotation = json.loads(ok("hub", "rotate-key", "--data", str(hub.data), "--overlap", "1s", "--json"))
        hub.wait(lambda: "switched to the next hub key" in hub.log(), 30, "the hub switching keys")
        make_token(hub, "after", "viewer", tmp_path)  # --data reads the new api.token

        log = entries(hub.data)
        actions = [(e["action"], e["role"]) for e in log]
        assert actions == [("token.create", "admin"), ("hub.rotate-token", "admin"), ("hub.rotate-key", "admin"),
                           ("token.create", "admin")]
        assert log[1]["who"].startswith("local:") and log[1]["from"].startswith("local:") and log[1]["status"] == 0
        assert log[2]["kid"] == rotation["next_kid"] and log[2]["params"]["next_key"] == rotation["next_key"]
        assert log[0]["kid"] != log[3]["kid"] == rotation["next_kid"]
        shown = ok("audit", "verify", "--data", str(hub.data))
        assert shown.startswith("audit log ok: 4 entries") and log[0]["kid"] in shown and old_public not in shown
    finally:
        hub.stop()
