"""API tokens with roles (hub/tokens.py), the route table's role checks (hub/api.py), and the signed, hash-chained
audit log with its verifier (hub/audit.py), in process. tests/system/test_roles_audit_e2e.py has the real hub."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

from agent.runtime.clock import now_ms
from hub import api, audit
from hub.api import ROUTES, Route, create_app, unguarded
from hub.audit import (GENESIS, HEAD_FILE, LOG_FILE, MAX_GROUP, ROTATE_KEY, AuditLog, Record, RefusalBudget,
                       entry_hash, seal, verify)
from hub.errors import Conflict, NotFound, Unprocessable
from agent.runtime.storage import write_private
from hub.tokens import ADMIN, OPERATOR, ROLES, TOKENS_FILE, VIEWER, Caller, TokenStore, allows
from protocols import kid_for

NOW = 1_700_000_000_000
ADMIN_TOKEN = "the-admin-token"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- tokens ----------------------------------------------------------------------------------------------------

def test_roles_are_ordered_and_each_allows_what_the_ones_before_it_do() -> None:
    assert ROLES == (VIEWER, OPERATOR, ADMIN)
    assert [(have, need) for have in ROLES for need in ROLES if allows(have, need)] == [
        ("viewer", "viewer"), ("operator", "viewer"), ("operator", "operator"),
        ("admin", "viewer"), ("admin", "operator"), ("admin", "admin")]


def test_a_token_is_kept_only_as_its_hash_in_a_private_file_and_is_refused_once_revoked(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, lambda given: given == ADMIN_TOKEN)
    made, secret = store.create("ci", "viewer", "admin", NOW)
    assert store.identify(secret) == Caller("ci", "viewer")
    assert store.identify(ADMIN_TOKEN) == Caller("admin", "admin")
    assert store.identify("") is None and store.identify(secret + "x") is None and store.identify(secret[:-1]) is None
    text = (tmp_path / TOKENS_FILE).read_text()
    assert secret not in text and made.digest.hex() in text and mode(tmp_path / TOKENS_FILE) == 0o600
    assert [t["name"] for t in store.listing()] == ["admin", "ci"]
    assert "sha256" not in json.dumps(store.listing())
    # another store on the same file (a restarted hub) knows it; a revoke is seen by the next check
    again = TokenStore(tmp_path, lambda given: False)
    assert again.identify(secret) == Caller("ci", "viewer")
    store.revoke("ci")
    assert store.identify(secret) is None and again.identify(secret) is None


def test_token_names_roles_and_the_admin_token_are_checked(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, lambda given: False)
    store.create("ops", "operator", "admin", NOW)
    with pytest.raises(Conflict, match="revoke it first"):
        store.create("ops", "viewer", "admin", NOW)
    with pytest.raises(Conflict, match="rotate-token"):
        store.create("admin", "viewer", "admin", NOW)
    with pytest.raises(Conflict, match="rotate-token"):
        store.revoke("admin")
    with pytest.raises(Unprocessable, match="token name"):
        store.create("a/b", "viewer", "admin", NOW)
    with pytest.raises(Unprocessable, match="one of viewer, operator, admin"):
        store.create("x", "root", "admin", NOW)
    with pytest.raises(NotFound):
        store.revoke("nobody")


def test_a_token_file_edited_by_hand_is_honoured_and_a_broken_one_keeps_what_the_hub_had(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, lambda given: False)
    _, keep = store.create("keep", "viewer", "admin", NOW)
    _, drop = store.create("drop", "operator", "admin", NOW)
    path = tmp_path / TOKENS_FILE
    raw = json.loads(path.read_text())
    del raw["tokens"]["drop"]
    write_private(path, json.dumps(raw).encode())
    assert store.identify(drop) is None and store.identify(keep) == Caller("keep", "viewer")
    write_private(path, b"{not json")
    assert store.identify(keep) == Caller("keep", "viewer")  # logged once, and the tokens read last stay
    assert TokenStore(tmp_path, lambda given: False).identify(keep) is None  # a start with it accepts none


# -- the route table -------------------------------------------------------------------------------------------

def fake_hub(data: Path, **more: Any) -> Any:
    from hub.limits import Limits

    return types.SimpleNamespace(config=types.SimpleNamespace(limits=Limits(), data=data),
                                 check_token=lambda given: given == ADMIN_TOKEN, key=SigningKey.generate(),
                                 clock=now_ms, **more)


def test_every_route_declares_a_role_and_every_change_an_audited_action(tmp_path: Path) -> None:
    app = create_app(fake_hub(tmp_path))
    assert unguarded(app) == []
    served = {(m, r.path) for r in app.routes if isinstance(r, api.APIRoute) for m in r.methods or ()}
    assert served == {(r.method, r.path) for r in ROUTES}
    assert all(r.action for r in ROUTES if r.method != "GET")
    app.get("/new")(lambda: {})  # a route added without the table: found
    assert unguarded(app) == ["['GET'] /new"]


def test_a_route_without_a_handler_or_a_handler_without_a_route_stops_the_start(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "ROUTES", (*ROUTES, Route("GET", "/forgotten", VIEWER)))
    with pytest.raises(RuntimeError, match="no handler for GET /forgotten"):
        create_app(fake_hub(tmp_path))
    monkeypatch.setattr(api, "ROUTES", ROUTES[1:])
    with pytest.raises(RuntimeError, match="without a role"):
        create_app(fake_hub(tmp_path))


def _path(route: Route) -> str:
    return route.path.replace("{run_id}", "r-1").replace("{node_id}", "n1").replace("{name}", "ci")


def test_each_role_reaches_exactly_the_routes_it_may(tmp_path: Path) -> None:
    """Every route of the table with every role: 403 below its role, anything else from it up (the fake hub makes
    the handlers fail, which is fine: only the role check is under test here)."""
    hub = fake_hub(tmp_path / "hub")
    (tmp_path / "hub").mkdir()
    app = create_app(hub)
    store = TokenStore(tmp_path / "hub", hub.check_token)
    secrets = {role: store.create(role, role, "admin", NOW)[1] for role in (VIEWER, OPERATOR)}
    secrets[ADMIN] = ADMIN_TOKEN

    async def main() -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
            for route in ROUTES:
                for role, secret in secrets.items():
                    response = await client.request(route.method, _path(route),
                                                    headers={"Authorization": f"Bearer {secret}"})
                    out[(route.method, route.path, role)] = response.status_code
        return out

    statuses = asyncio.run(main())
    for (method, path, role), status in statuses.items():
        needed = next(r.role for r in ROUTES if (r.method, r.path) == (method, path))
        if allows(role, needed):  # type: ignore[arg-type]
            assert status not in (401, 403), (method, path, role, status)
        else:
            assert status == 403, (method, path, role, status)
    # every refusal is on record, with who and the role it lacked
    entries = [json.loads(line) for line in (tmp_path / "hub" / LOG_FILE).read_text().splitlines()]
    refused = [(e["who"], e["action"]) for e in entries if e["status"] == 403]
    assert ("viewer", "run.submit") in refused and ("operator", "node.accept") in refused
    assert ("operator", "token.create") in refused and not any(who == "admin" for who, _ in refused)
    assert verify(tmp_path / "hub", {kid_for(bytes(hub.key.verify_key)).hex(): bytes(hub.key.verify_key)}).ok


# -- the audit log ---------------------------------------------------------------------------------------------

def record(i: int, action: str = "run.cancel", **params: Any) -> Record:
    return Record(NOW + i, "ops", "operator", action, f"r-{i}", "10.0.0.7", 200, params)


def roots(*keys: SigningKey) -> dict[str, bytes]:
    return {kid_for(bytes(k.verify_key)).hex(): bytes(k.verify_key) for k in keys}


def write_log(data: Path, key: SigningKey, n: int = 5) -> None:
    log = AuditLog(data, lambda: key)
    for i in range(1, n + 1):
        log.append(record(i, reason=f"because {i}"))


def lines(data: Path) -> list[str]:
    return (data / LOG_FILE).read_text().splitlines(keepends=True)


def rewrite(data: Path, new: list[str]) -> None:
    (data / LOG_FILE).write_text("".join(new))


def test_a_log_the_hub_wrote_verifies_and_is_private(tmp_path: Path) -> None:
    key = SigningKey.generate()
    write_log(tmp_path, key)
    verdict = verify(tmp_path, roots(key))
    assert verdict.ok and verdict.entries == 5, verdict.message
    assert verdict.message.startswith("audit log ok: 5 entries (seq 1-5)")
    first = json.loads(lines(tmp_path)[0])
    assert first["prev"] == GENESIS and first["seq"] == 1 and first["who"] == "ops" and first["from"] == "10.0.0.7"
    assert mode(tmp_path / LOG_FILE) == 0o600 and mode(tmp_path / HEAD_FILE) == 0o600
    assert verify(tmp_path / "none", roots(key)).ok  # nothing written yet: nothing wrong


def test_any_text_a_request_carries_is_logged_and_verifies(tmp_path: Path) -> None:
    key = SigningKey.generate()
    AuditLog(tmp_path, lambda: key).append(record(1, reason="caf\u00e9 \ud800 \U0001f525"))  # a lone surrogate too
    verdict = verify(tmp_path, roots(key))
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("tamper, says", [
    ("edit", "line 3 (seq 3): changed: its content does not match its hash"),
    ("remove", "line 3 (seq 4): removed: seq 3 missing before it"),
    ("swap", "line 2 (seq 3): reordered: seq 3 stands where seq 2 belongs"),
    ("resign", "line 3 (seq 3): bad signature: signed by kid"),
    ("resign-same-kid", "line 3 (seq 3): bad signature: it does not verify"),
    ("cut-end", "removed: the log ends at seq 4 but audit.head says seq 5"),
    ("cut-end-and-head", "removed: audit.head is missing"),
])
def test_verify_names_the_first_entry_changed_removed_reordered_or_badly_signed(tmp_path: Path, tamper: str,
                                                                                says: str) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    write_log(tmp_path, key)
    entries = lines(tmp_path)
    if tamper == "edit":
        entries[2] = entries[2].replace('"who":"ops"', '"who":"someone-else"')
    elif tamper == "remove":
        del entries[2]
    elif tamper == "swap":
        entries[1], entries[2] = entries[2], entries[1]
    elif tamper.startswith("resign"):
        entry = json.loads(entries[2])
        entry["target"] = "r-other"
        if tamper == "resign":
            entry["kid"] = kid_for(bytes(other.verify_key)).hex()
        entry["hash"] = entry_hash(entry)
        entry["sig"] = other.sign(b"fleetflow audit entry v1\n" + bytes.fromhex(entry["hash"])).signature.hex()
        entries[2] = json.dumps(entry) + "\n"
    elif tamper.startswith("cut-end"):
        del entries[-1]
        if tamper == "cut-end-and-head":
            (tmp_path / HEAD_FILE).unlink()
    rewrite(tmp_path, entries)
    verdict = verify(tmp_path, roots(key))
    assert not verdict.ok and says in verdict.message, verdict.message


def test_a_whole_log_rewritten_with_another_key_fails_at_its_first_entry(tmp_path: Path) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    write_log(tmp_path, other)
    verdict = verify(tmp_path, roots(key))
    assert not verdict.ok and verdict.message.startswith("line 1 (seq 1): bad signature"), verdict.message


def test_entries_signed_before_a_key_rotation_stay_valid_through_the_rotation_entry(tmp_path: Path) -> None:
    old, new, intruder = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    write_log(tmp_path, old, 2)
    rotation = Record(NOW + 3, "local:root", "admin", ROTATE_KEY, kid_for(bytes(new.verify_key)).hex(), "local:h",
                      0, {"previous_key": bytes(old.verify_key).hex(), "next_key": bytes(new.verify_key).hex()})
    AuditLog(tmp_path, lambda: new).append(rotation)
    AuditLog(tmp_path, lambda: new).append(record(4))
    verdict = verify(tmp_path, roots(new))  # the data directory holds only the new key now
    assert verdict.ok and verdict.entries == 4, verdict.message
    assert kid_for(bytes(old.verify_key)).hex() in verdict.message
    # A rotation entry names only the key before the one that signs it: one signed by an intruder vouches nothing.
    forged = Record(NOW + 5, "x", "admin", ROTATE_KEY, "", "x", 0,
                    {"previous_key": bytes(intruder.verify_key).hex()})
    AuditLog(tmp_path, lambda: intruder).append(forged)
    verdict = verify(tmp_path, roots(new))
    assert not verdict.ok and verdict.message.startswith("line 5 (seq 5): bad signature: signed by kid")
    # Without its rotation entry, the old key's entries cannot be trusted, and the gap shows.
    entries = lines(tmp_path)
    rewrite(tmp_path, entries[:2] + entries[3:4])
    verdict = verify(tmp_path, roots(new))
    assert not verdict.ok and verdict.message.startswith("line 1 (seq 1): bad signature"), verdict.message


def test_appends_chain_across_writers_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    key = SigningKey.generate()
    write_log(tmp_path, key, 2)
    with open(tmp_path / LOG_FILE, "ab") as torn:  # a crash in the middle of a write
        torn.write(b'{"seq": 3, "at"')
    entry = AuditLog(tmp_path, lambda: key).append(record(3))
    assert entry["seq"] == 3 and entry["prev"] == json.loads(lines(tmp_path)[1])["hash"]
    assert verify(tmp_path, roots(key)).ok
    assert os.stat(tmp_path / LOG_FILE).st_size == sum(len(x.encode()) for x in lines(tmp_path))
    assert seal(record(9), 9, GENESIS, key)["kid"] == kid_for(bytes(key.verify_key)).hex()


def failing(error: OSError) -> Callable[..., None]:
    """A stand-in for a disk call that fails with `error`."""
    def fail(*_: Any) -> None:
        raise error
    return fail


def test_writes_asked_for_together_share_one_fsync_and_each_is_answered_with_its_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = SigningKey.generate()
    log = AuditLog(tmp_path, lambda: key)
    synced: list[int] = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)

    async def scenario() -> list[dict[str, Any]]:
        first = await log.write(record(1))  # alone: as before, the log, the head file and the directory
        assert first["seq"] == 1 and len(synced) == 4  # (the log's first append also syncs its directory)
        return await asyncio.gather(*(log.write(record(i)) for i in range(2, 22)))

    entries = asyncio.run(scenario())
    assert [e["seq"] for e in entries] == list(range(2, 22))  # each caller has its own entry, in the order asked
    assert [e["target"] for e in entries] == [f"r-{i}" for i in range(2, 22)]
    assert len(synced) - 4 == 3  # twenty entries written as one: one fsync of the log, and the head's two
    verdict = verify(tmp_path, roots(key))
    assert verdict.ok and verdict.entries == 21, verdict.message
    head = json.loads((tmp_path / HEAD_FILE).read_text())
    assert (head["seq"], head["hash"]) == (21, entries[-1]["hash"])


def test_an_entry_that_cannot_be_written_fails_only_its_own_write(tmp_path: Path) -> None:
    key = SigningKey.generate()
    log = AuditLog(tmp_path, lambda: key)

    async def scenario() -> list[Any]:
        return await asyncio.gather(log.write(record(1)), log.write(record(2, odd={1, 2})), log.write(record(3)),
                                    return_exceptions=True)

    first, odd, third = asyncio.run(scenario())
    assert isinstance(odd, TypeError)  # a set is no JSON: that request fails (a 500), the others are on record
    assert (first["target"], third["target"]) == ("r-1", "r-3")
    verdict = verify(tmp_path, roots(key))
    assert verdict.ok and verdict.entries == 2, verdict.message


def test_a_head_not_replaced_leaves_entries_on_record_a_log_that_verifies_and_a_rolled_back_head_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key = SigningKey.generate()
    write_log(tmp_path, key, 2)
    old_head = (tmp_path / HEAD_FILE).read_text()
    monkeypatch.setattr(audit, "write_private", failing(OSError(28, "No space left on device")))
    # The group is in the log, fsync'd; its head cannot be written (a full disk at that moment, or a crash there):
    # every entry is on record, so each request is answered as done, and the log says what happened to the head.
    written = AuditLog(tmp_path, lambda: key).append_all([record(i) for i in range(3, 3 + MAX_GROUP)])
    assert [e["seq"] for e in written] == list(range(3, 3 + MAX_GROUP))  # type: ignore[index]
    assert f"entries up to seq {MAX_GROUP + 2} are written, but audit.head could not be replaced" in caplog.text
    assert (tmp_path / HEAD_FILE).read_text() == old_head
    verdict = verify(tmp_path, roots(key))
    assert verdict.ok and verdict.entries == MAX_GROUP + 2, verdict.message  # the head names the append before
    monkeypatch.undo()
    write_log(tmp_path, key, 1)  # one entry more: that head is now further back than any append could leave it
    (tmp_path / HEAD_FILE).write_text(old_head)
    verdict = verify(tmp_path, roots(key))
    assert not verdict.ok and "names seq 2 but the log goes on to seq 67 (the head was rolled back)" in verdict.message


def test_a_failed_write_takes_back_the_whole_group_and_a_short_write_is_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = SigningKey.generate()
    write_log(tmp_path, key, 2)
    size = (tmp_path / LOG_FILE).stat().st_size
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "fsync", failing(OSError(5, "EIO")))
    log = AuditLog(tmp_path, lambda: key)

    async def three() -> list[Any]:
        return await asyncio.gather(*(log.write(record(i)) for i in (3, 4, 5)), return_exceptions=True)

    assert all(isinstance(result, OSError) for result in asyncio.run(three()))  # each request hears it failed
    assert (tmp_path / LOG_FILE).stat().st_size == size  # and nothing of the group stays in the log
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # a disk taking 7 bytes a go
    assert [e["seq"] for e in asyncio.run(three())] == [3, 4, 5]  # no entry twice, none lost
    verdict = verify(tmp_path, roots(key))
    assert verdict.ok and verdict.entries == 5, verdict.message


def test_refused_requests_from_one_address_are_audited_within_a_budget_and_the_rest_counted() -> None:
    budget = RefusalBudget(per_minute=3, addresses=2)
    assert [budget.take("a", NOW) for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("b", NOW) == 0  # another address has its own budget
    assert budget.take("a", NOW + 60_000) == 2  # the next minute: written, saying how many were not
    assert budget.take("c", NOW) == 0 and budget.take("d", NOW) == 0  # past `addresses`: new ones share one


def test_no_token_is_created_or_revoked_while_the_token_file_cannot_be_read(tmp_path: Path) -> None:
    from hub.errors import Unavailable

    path = tmp_path / TOKENS_FILE
    store = TokenStore(tmp_path, lambda given: False)
    _, keep = store.create("keep", "viewer", "admin", NOW)
    held = path.read_bytes()
    write_private(path, b"{not json")
    for change in (lambda: store.create("new", "viewer", "admin", NOW), lambda: store.revoke("keep")):
        with pytest.raises(Unavailable, match="cannot|expected JSON") as refused:
            change()
        assert refused.value.status == 503 and str(path) in str(refused.value)
    assert path.read_bytes() == b"{not json"  # nothing saved from the map the hub held
    started_broken = TokenStore(tmp_path, lambda given: False)  # a hub started with the file broken holds no token
    with pytest.raises(Unavailable):
        started_broken.create("new", "viewer", "admin", NOW)
    assert path.read_bytes() == b"{not json"
    write_private(path, held)  # put right: writes work again, from what the file holds
    started_broken.create("new", "viewer", "admin", NOW)
    assert store.identify(keep) == Caller("keep", "viewer") and sorted(json.loads(path.read_text())["tokens"]) == [
        "keep", "new"]
