"""Enrollment rules (hub/registry.py), the enroll token's proof (protocols/messages.py), the hub's answers to enroll
requests, and secrets kept off the command line. No broker: tests/system/test_enrollment_e2e.py has the wire."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import cbor2
import nacl.signing
import pytest

from hub.registry import EnrollPolicy, KeyMismatch, Registry, RegistryError, fingerprint, token_fingerprint
from protocols import Ack, Enroll, kid_for
from protocols.enrollment import check_enroll_proof, enroll_proof
from tests.cli import fleetflow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-long-random-enroll-token-0123456789"
PENDING = EnrollPolicy()


def key(n: int) -> bytes:
    return bytes(nacl.signing.SigningKey(bytes([n]) * 32).verify_key)


# -- registry rules ------------------------------------------------------------------------------------------------

def test_a_pending_request_that_changes_keys_starts_over_and_the_reviewed_kid_no_longer_accepts(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "nodes.json")
    first = registry.request("n1", key(1), "rpi4", {"site": "a"}, 100, PENDING)
    assert (first.verdict, first.new, first.kid) == ("pending", True, kid_for(key(1)).hex())
    reviewed = registry.get("n1")["kid"]  # type: ignore[index]  # what `nodes show` prints
    swapped = registry.request("n1", key(2), "rpi4", {"site": "b"}, 200, PENDING)
    assert swapped.verdict == "pending" and swapped.replaced_kid == reviewed
    doc = registry.get("n1")
    assert doc is not None and doc["key"] == key(2).hex() and doc["requested_at"] == 200
    assert doc["labels"] == {"site": "b"}
    with pytest.raises(KeyMismatch, match=fingerprint(key(2))):
        registry.accept("n1", reviewed, 300)
    assert registry.get("n1")["state"] == "pending" and registry.accepted_keys() == []  # type: ignore[index]
    # the operator checks again and accepts what they now see: by kid, or by the whole key
    assert registry.accept("n1", key(2).hex(), 400)["state"] == "accepted"
    assert registry.accepted_keys() == [("n1", key(2))]


def test_pending_requests_are_capped_and_the_oldest_is_dropped(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "nodes.json")
    capped = EnrollPolicy(max_pending=3)
    assert registry.request("old-accepted", key(9), "", {}, 1, EnrollPolicy(auto_accept=True)).verdict == "accepted"
    for i in (1, 2, 3):
        assert registry.request(f"n{i}", key(i), "", {}, 10 + i, capped).dropped == ()
    assert registry.request("n4", key(4), "", {}, 20, capped).dropped == ("n1",)
    assert registry.get("n1") is None and registry.pending_count() == 3
    # a changed key sends a request to the back of the queue: n3 is now the oldest
    registry.request("n2", key(22), "", {}, 21, capped)
    assert registry.request("n5", key(5), "", {}, 22, capped).dropped == ("n3",)
    assert registry.request("n2", key(22), "", {}, 23, capped).dropped == ()  # asking again takes no room
    assert {d["id"] for d in registry.all()} == {"old-accepted", "n2", "n4", "n5"}  # accepted nodes never dropped
    registry.flush()
    reopened = Registry(tmp_path / "nodes.json")  # the order survives a restart
    assert reopened.request("n6", key(6), "", {}, 30, capped).dropped == ("n4",)


def test_token_uses_are_bounded_counted_durably_and_a_known_key_uses_none(tmp_path: Path) -> None:
    policy = EnrollPolicy(token=token_fingerprint(TOKEN), token_uses=2)
    registry = Registry(tmp_path / "nodes.json")
    admitted = registry.request("n1", key(1), "", {}, 1, policy, proof=True)
    assert (admitted.verdict, admitted.admitted_by, admitted.token_uses) == ("accepted", "token", 1)
    again = registry.request("n1", key(1), "", {}, 2, policy, proof=True)  # a restart, a lost ack
    assert again.verdict == "accepted" and registry.token_uses(policy.token) == 1
    assert registry.request("n2", key(2), "", {}, 3, policy, proof=True).token_uses == 2
    registry.flush()
    reopened = Registry(tmp_path / "nodes.json")
    assert reopened.token_uses(policy.token) == 2
    spent = reopened.request("n3", key(3), "", {}, 4, policy, proof=True)
    assert (spent.verdict, spent.token) == ("pending", "spent")
    assert reopened.token_uses(policy.token) == 2
    # a new token starts from zero; a bad proof admits nothing and uses nothing
    fresh = EnrollPolicy(token=token_fingerprint(TOKEN + "-rotated"), token_uses=1)
    assert reopened.request("n4", key(4), "", {}, 5, fresh, proof=False).token == "bad"
    assert reopened.get("n4")["state"] == "pending" and reopened.token_uses(fresh.token) == 0  # type: ignore[index]
    assert reopened.request("n4", key(4), "", {}, 6, fresh, proof=True).verdict == "accepted"


def test_the_hub_id_is_reserved_and_a_taken_id_is_said_to_be_taken(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "nodes.json")
    assert registry.request("hub", key(1), "", {}, 1, EnrollPolicy(auto_accept=True)).verdict == "reserved"
    assert registry.get("hub") is None and registry.accepted_keys() == []
    with pytest.raises(RegistryError, match="reserved"):
        registry.add("hub", key(1), 2)
    registry.add("n1", key(1), 3)
    taken = registry.request("n1", key(2), "", {}, 4, EnrollPolicy(auto_accept=True), proof=True)
    assert (taken.verdict, taken.enrolled_kid, taken.kid) == ("taken", fingerprint(key(1)), fingerprint(key(2)))
    assert registry.accepted_keys() == [("n1", key(1))]
    registry.set_state("n1", "revoked", 5)
    assert registry.request("n1", key(2), "", {}, 6, PENDING).verdict == "rejected"


# -- the enroll token's proof --------------------------------------------------------------------------------------

def test_a_proof_is_good_for_one_fleet_node_id_and_key_and_one_token() -> None:
    proof = enroll_proof(TOKEN, "plant-1", "n1", key(1))
    assert check_enroll_proof(proof, TOKEN, "plant-1", "n1", key(1))
    assert not check_enroll_proof(proof, TOKEN, "plant-1", "n1", key(2))   # sniffed, put on another key
    assert not check_enroll_proof(proof, TOKEN, "plant-1", "n2", key(1))   # ... or another node id
    assert not check_enroll_proof(proof, TOKEN, "plant-2", "n1", key(1))   # ... or another fleet
    assert not check_enroll_proof(proof, "another-token-0123456789", "plant-1", "n1", key(1))  # wrong token
    assert not check_enroll_proof(None, TOKEN, "plant-1", "n1", key(1))


def test_the_proof_is_exactly_what_the_spec_and_the_vector_say() -> None:
    vector = next(v for v in json.loads((ROOT / "protocols/vectors/envelopes.json").read_text())
                  if v["name"] == "valid-enroll")
    payload = vector["payload"]
    # Recomputed from docs/protocol.md section 7.1 with a general CBOR encoder, not with our code.
    mac_input = cbor2.dumps(["fleetflow-enroll-proof-v1", payload["fleet"], payload["src"],
                             bytes.fromhex(payload["key"])])
    assert mac_input.hex() == vector["proof_input_hex"]
    expected = hmac.new(vector["enroll_token"].encode(), mac_input, hashlib.sha256).hexdigest()
    assert payload["proof"] == expected
    assert enroll_proof(vector["enroll_token"], payload["fleet"], payload["src"],
                        bytes.fromhex(payload["key"])).hex() == expected
    assert "token" not in payload  # the token itself is never on the wire


# -- the hub's answers -------------------------------------------------------------------------------------------------

@pytest.fixture
def make_hub(tmp_path: Path) -> Any:
    from hub.service import Hub, HubConfig

    hubs: list[Hub] = []

    def make(**settings: Any) -> Any:
        hub = Hub(HubConfig(broker="mqtt://127.0.0.1:1", fleet="plant-1", data=tmp_path / f"hub{len(hubs)}",
                            **settings))
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.journal.close()
        hub.registry.close()
        hub.meta.close()


def enroll(hub: Any, node: str, public_key: bytes, proof: bytes | None = None) -> list[tuple[str, Any]]:
    replies: list[tuple[str, Any]] = []
    hub.admin.enroll(node, Enroll(public_key, "rpi4", {}, proof), 1_000, replies)
    return replies


def test_hub_answers_with_the_verdict_and_the_kid_it_is_about(make_hub: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, "fleetflow.hub")
    hub = make_hub(enroll_token=TOKEN, enroll_token_uses=5)  # uses to spare: only the proof's binding refuses
    real = enroll(hub, "n1", key(1), enroll_proof(TOKEN, "plant-1", "n1", key(1)))
    assert real == [("n1", Ack((), "accepted", kid_for(key(1))))]
    # the real proof, sniffed and put on another key (the attacker signs with that key): not admitted
    assert enroll(hub, "n2", key(2), enroll_proof(TOKEN, "plant-1", "n1", key(1))) == \
        [("n2", Ack((), "pending", kid_for(key(2))))]
    assert enroll(hub, "n3", key(3), enroll_proof("a-wrong-token-0123456789", "plant-1", "n3", key(3)))[0][1].enroll \
        == "pending"
    assert "proof does not verify" in caplog.text
    taken = enroll(hub, "n1", key(4))
    assert taken == [("n1", Ack((), "taken", kid_for(key(4))))]
    assert f"the id is taken: it is enrolled with kid {fingerprint(key(1))}" in caplog.text
    assert enroll(hub, "hub", key(5)) == [] and hub.registry.get("hub") is None
    assert "node id 'hub'" in caplog.text
    assert hub.metrics.enrollments.labels("reserved")._value.get() == 1
    assert [k.owner for k in hub.receiver.keyring] == ["n1"]


def test_hub_drops_the_oldest_pending_request_counts_and_logs_it(make_hub: Any, caplog: Any) -> None:
    hub = make_hub(max_pending=2)
    for i in (1, 2, 3):
        enroll(hub, f"n{i}", key(i))
    assert hub.registry.get("n1") is None and hub.registry.pending_count() == 2
    assert hub.metrics.enroll_dropped._value.get() == 1
    assert "dropped the oldest, from node n1" in caplog.text


def test_hub_accept_names_the_reviewed_key(make_hub: Any, caplog: Any) -> None:
    from hub.errors import OperatorError

    caplog.set_level(logging.INFO, "fleetflow.hub")
    hub = make_hub()
    enroll(hub, "n1", key(1))
    assert f"fleetflow nodes accept n1 --kid {fingerprint(key(1))}" in caplog.text  # the hub's log names the kid
    enroll(hub, "n1", key(2))  # swapped in after the operator looked
    assert f"kid {fingerprint(key(1))} -> {fingerprint(key(2))}" in caplog.text
    with pytest.raises(OperatorError) as refused:
        asyncio.run(hub.node_action("n1", "accept", kid=fingerprint(key(1))))
    assert refused.value.status == 409 and len(hub.receiver.keyring) == 0
    with pytest.raises(OperatorError) as unnamed:
        asyncio.run(hub.node_action("n1", "accept"))
    assert unnamed.value.status == 422
    assert asyncio.run(hub.node_action("n1", "accept", kid=fingerprint(key(2))))["state"] == "accepted"
    assert [k.public_key for k in hub.receiver.keyring] == [key(2)]


# -- secrets stay off the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["run", "list", "--hub", "http://127.0.0.1:1", "--token", "s3cret"], "FLEETFLOW_TOKEN or --token-file"),
    (["nodes", "accept", "n1", "--kid", "00" * 8, "--token", "s3cret"], "FLEETFLOW_TOKEN or --token-file"),
    (["sim", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--token", "s3cret"], "FLEETFLOW_TOKEN or --token-file"),
    (["hub", "run", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--data", "/nonexistent",
      "--enroll-token", "s3cret"], "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file"),
    (["agent", "run", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--node-id", "n1", "--data", "/nonexistent",
      "--enroll-token", "s3cret"], "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file"),
])
def test_a_secret_given_as_a_flag_is_refused_with_where_to_put_it(args: list[str], says: str) -> None:
    out = fleetflow(*args)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "ps" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_token_files_are_mode_checked_and_env_still_works(tmp_path: Path) -> None:
    token = tmp_path / "api.token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    loose = fleetflow("run", "list", "--hub", "http://127.0.0.1:1", "--token-file", str(token))
    assert loose.returncode == 2 and "accessible by other users" in loose.stderr and "chmod 600" in loose.stderr
    token.chmod(0o600)
    for args, env in ((["--token-file", str(token)], {}), ([], {"FLEETFLOW_TOKEN": "s3cret"}),
                      ([], {"FLEETFLOW_TOKEN_FILE": str(token)})):
        out = fleetflow("run", "list", "--hub", "http://127.0.0.1:1", *args, env=env)
        assert out.returncode == 3 and "cannot reach" in out.stderr, (args, env, out.stderr)  # the token was found
    short = tmp_path / "enroll.token"
    short.write_text("short\n")
    short.chmod(0o600)
    out = fleetflow("hub", "run", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--data", str(tmp_path / "hub"),
                    "--enroll-token-file", str(short))
    assert out.returncode == 2 and "at least 16" in out.stderr


def test_agent_reads_the_enroll_token_from_a_file_or_the_environment(tmp_path: Path) -> None:
    from agent.config import ConfigError, load_config

    required = {"broker": "mqtt://h:1", "fleet": "f", "node_id": "n1", "data": str(tmp_path)}
    path = tmp_path / "enroll.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert load_config({**required, "enroll_token_file": str(path)}, None, {}).enroll_token == TOKEN
    assert load_config(required, None, {"FLEETFLOW_ENROLL_TOKEN": TOKEN}).enroll_token == TOKEN
    assert load_config(required, None, {"FLEETFLOW_ENROLL_TOKEN_FILE": str(path)}).enroll_token == TOKEN
    # a file flag wins over the environment, like every flag
    assert load_config({**required, "enroll_token_file": str(path)}, None,
                       {"FLEETFLOW_ENROLL_TOKEN": "other"}).enroll_token == TOKEN
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="accessible by other users"):
        load_config({**required, "enroll_token_file": str(path)}, None, {})
    with pytest.raises(ConfigError, match="not accepted on the command line"):
        load_config({**required, "enroll_token": TOKEN}, None, {})
