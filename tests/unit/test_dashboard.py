"""The dashboard's pure parts (hub/ui/): the live stream's coalescing and resumption, the telemetry history, the
fleet rows' reasons; and its sessions, CSRF check and headers through the real API app in process. A real browser
drives it in tests/system/test_dashboard.py."""

from __future__ import annotations

import asyncio
import math
import types
from pathlib import Path
from typing import Any

import httpx
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from starlette.routing import Mount
from starlette.routing import Route as StarletteRoute

from agent.runtime.clock import now_ms
from hub.api import APIRoute, create_app
from hub.events import HealthChanged, NodeBorn, NodeFailed, NodeSeen, NodeSuspected
from hub.limits import Limits
from hub.state import Core
from hub.tokens import TokenStore
from hub.ui.feed import NODE, RUN, Coalescer, render
from hub.ui.routes import PUBLIC, resume_point
from hub.ui.session import COOKIE, CSP, Sessions
from hub.ui.telemetry import TelemetryHistory
from hub.ui.views import fleet_row, health_cause, liveness_reason

NOW = 1_700_000_000_000
ADMIN_TOKEN = "the-admin-token"


# -- the stream: coalescing and resumption ---------------------------------------------------------------------

def test_a_thing_changed_many_times_goes_out_once_a_second_with_its_latest_state() -> None:
    changes = Coalescer(applied=10, spacing=1.0)
    changes.track(True)
    changes.note(11, [(NODE, "a")])
    assert changes.collect(0.0) == ([(NODE, "a")], None)
    changes.note(12, [(NODE, "a")])
    changes.note(13, [(NODE, "a"), (NODE, "b")])
    due, wait = changes.collect(0.4)
    assert due == [(NODE, "b")] and wait is not None and math.isclose(wait, 0.6)
    assert changes.watermark() == 11  # a's change 12 is held back: a resume must start before it
    assert changes.collect(0.9) == ([], changes.collect(0.9)[1])
    assert changes.collect(1.0) == ([(NODE, "a")], None)
    assert changes.watermark() == 13


def test_resuming_reaches_back_as_far_as_the_tail_and_never_past_what_was_applied() -> None:
    changes = Coalescer(applied=100, tail=3)
    assert changes.since(100) == set() and changes.since(99) is None and changes.since(101) is None
    changes.note(101, [(NODE, "a")])
    changes.note(102, [(RUN, "r1"), (NODE, "b")])
    assert changes.since(100) == {(NODE, "a"), (RUN, "r1"), (NODE, "b")}
    assert changes.since(101) == {(RUN, "r1"), (NODE, "b")}
    changes.note(103, [(NODE, "c")])  # a's entry falls out of the tail
    assert changes.since(100) is None and changes.since(101) == {(RUN, "r1"), (NODE, "b"), (NODE, "c")}
    assert not changes.dirty  # nobody connected: nothing is marked due


KEYS = [(NODE, "a"), (NODE, "b"), (RUN, "r")]
STEPS = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, 1.2])  # seconds; around the coalescing second
OPS = st.lists(st.one_of(
    st.tuples(st.just("change"), st.lists(st.sampled_from(KEYS), max_size=3)),
    st.tuples(st.just("flush"), STEPS),                           # time passes, then what is due goes out
    st.tuples(st.just("cut"), STEPS, st.integers(0, 2)),          # that batch is cut after n of its events
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(OPS)
@example([("change", [(NODE, "a")]), ("flush", 0.0), ("change", [(NODE, "a")]), ("change", [(NODE, "b")]),
          ("flush", 0.1), ("cut", 1.0, 0)])  # a's second change held back while b's batch goes out, then cut
def test_a_consumer_that_resumes_from_its_last_id_ends_with_the_latest_state_of_everything(ops: list[Any]) -> None:
    """The stream's promise, with the id rule of `render` (only a batch's last event carries the id): whatever the
    cuts, resuming from the last id received loses no change; and live updates of one thing are a second apart."""
    changes = Coalescer(applied=0, tail=10_000, spacing=1.0)
    changes.track(True)
    seq, now = 0, 0.0
    latest: dict[tuple[str, str], int] = {}   # the state of each thing: the seq of its latest change
    held: dict[tuple[str, str], int] = {}     # what the consumer holds
    last_id = 0
    sent_live: dict[tuple[str, str], float] = {}

    def deliver(keys: list[tuple[str, str]], watermark: int, read: int | None = None) -> None:
        nonlocal last_id
        batch = [(key, latest.get(key, 0)) for key in keys]
        complete = read is None or read >= len(batch)
        for key, state in batch[:len(batch) if complete else read]:
            held[key] = state
        if complete and batch:
            last_id = watermark  # on the last event only

    def flush(advance: float, read: int | None = None) -> None:
        nonlocal now
        now += advance
        due, _ = changes.collect(now)
        for key in due:
            assert now - sent_live.get(key, -math.inf) >= 1.0
            sent_live[key] = now
        deliver(due, changes.watermark(), read)

    for op in ops:
        if op[0] == "change" and op[1]:
            seq += 1
            changes.note(seq, op[1])
            latest.update((key, seq) for key in op[1])
        elif op[0] == "flush":
            flush(op[1])
        elif op[0] == "cut":
            flush(op[1], read=op[2])
            missed = changes.since(last_id)
            assert missed is not None
            deliver(sorted(missed), changes.watermark())
    flush(2.0)
    assert held == latest


def test_only_the_last_event_of_a_batch_carries_the_id() -> None:
    core = Core()
    for node in ("a", "b"):
        core.apply(NodeBorn(NOW, node, boot=1, profile="container", labels={"x": "<b>\nid: 9"}))
    hub = types.SimpleNamespace(core=core, views={})
    text = render(hub, [(NODE, "a"), (NODE, "b"), (NODE, "gone")], 7).decode()  # type: ignore[arg-type]
    events = text.strip().split("\n\n")
    assert [e.count("\nid: ") for e in events] == [0, 0, 1] and events[-1].endswith('"gone":true}')
    assert events[-1].splitlines()[1] == "id: 7"
    assert all(len(e.splitlines()) <= 3 for e in events)  # a label's line break stays inside one JSON line
    assert render(hub, [], 7) == b""  # type: ignore[arg-type]


def test_where_a_consumer_resumes() -> None:
    assert resume_point(None, None) is None and resume_point(None, 5) == 5
    assert resume_point("12", 5) == 12 and resume_point(" 12 ", None) == 12
    assert resume_point("x1", 5) == -1 and resume_point("", 5) == 5  # not ours: nothing to resume from


# -- telemetry history -----------------------------------------------------------------------------------------

def test_telemetry_keeps_one_sample_per_slot_for_the_window_and_the_latest_stands_for_its_slot() -> None:
    history = TelemetryHistory(window_ms=60_000, resolution_ms=10_000)
    assert history.slots == 6
    history.add("n1", NOW, {"cpu": 10.0, "temp": 40.0})
    history.add("n1", NOW + 4_000, {"cpu": 20.0, "temp": 41.0})   # same slot: replaces
    history.add("n1", NOW + 10_000, {"cpu": 30.0, "other": 1.0})  # new slot; temp missing
    history.add("n1", NOW + 9_000, {"cpu": 99.0})                 # late: ignored
    series = history.series("n1", NOW + 10_000)
    assert series["at"] == [NOW + 4_000, NOW + 10_000]
    assert series["cpu"] == [20.0, 30.0] and series["temp"] == [41.0, None] and "mem" not in series
    for i in range(2, 12):  # wraps around: only the last hour's (here: minute's) slots stay
        history.add("n1", NOW + i * 10_000, {"cpu": float(i)})
    series = history.series("n1", NOW + 110_000)
    assert series["cpu"] == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0] and len(series["at"]) == 6
    assert history.series("n1", NOW + 200_000)["at"] == []  # all older than the window
    history.forget("n1")
    assert history.series("n1", NOW)["at"] == [] and history.series("nobody", NOW)["window_ms"] == 60_000


# -- fleet rows ------------------------------------------------------------------------------------------------

def test_a_fleet_row_names_why_the_node_is_in_its_state_and_the_metric_behind_its_health() -> None:
    core = Core()
    core.apply(NodeBorn(NOW, "n1", boot=1, profile="gateway", labels={"site": "a"}, hb=2.0))
    node = core.nodes["n1"]
    assert liveness_reason(node) == "heartbeats arriving" and health_cause(node) is None
    core.apply(NodeSuspected(NOW + 5_000, "n1"))
    assert liveness_reason(node) == "missed heartbeats"
    core.apply(NodeSeen(NOW + 6_000, "n1"))
    assert liveness_reason(node) == "heartbeats arriving"
    core.apply(NodeFailed(NOW + 9_000, "n1", "no heartbeat for 6.0 s"))
    assert liveness_reason(node) == "no heartbeat for 6.0 s"
    core.apply(NodeBorn(NOW + 20_000, "n1", boot=2, profile="gateway", hb=2.0))
    assert liveness_reason(node) == "birth, boot 2"
    core.apply(NodeSuspected(NOW + 25_000, "n1"))
    core.apply(NodeSeen(NOW + 26_000, "n1"))
    assert liveness_reason(node) == "birth, boot 2"  # the entry still names how it came back online
    core.apply(HealthChanged(NOW + 30_000, "n1", "unhealthy", "temp", 95.0, 90.0, 3.0, "temp 95 over 90 for 3 s"))
    cause = health_cause(node)
    assert cause is not None and cause["metric"] == "temp" and cause["value"] == 95.0 and not cause["recovered"]
    row = fleet_row(core, {}, "n1")
    assert row is not None and row["health"] == "unhealthy" and row["liveness"] == "online" and row["hb"] == 2.0
    assert row["version"] is None and row["running"] == [] and fleet_row(core, {}, "nobody") is None


# -- sessions, CSRF and headers through the API app ------------------------------------------------------------

def test_sessions_end_when_idle_or_old_and_the_least_recently_used_goes_first() -> None:
    sessions = Sessions(idle=10, lifetime=100, limit=2)
    first, _ = sessions.open("t1", 0)
    second, _ = sessions.open("t2", 1)
    assert sessions.find(first, 5) is not None  # used at 5: second is now the least recently used
    third, made = sessions.open("t3", 6)
    assert sessions.find(second, 6) is None and len(sessions) == 2 and made.token == "t3"
    assert sessions.find(first, 14) is not None and sessions.find(first, 25) is None  # idle past 10
    kept, _ = sessions.open("t4", 30)
    for t in range(39, 160, 9):
        assert (sessions.find(kept, t) is not None) == (t - 30 <= 100)  # used all along, but not past its lifetime
    sessions.close(third)
    assert sessions.find(third, 7) is None


def fake_hub(data: Path) -> Any:
    return types.SimpleNamespace(config=types.SimpleNamespace(limits=Limits(), data=data, fleet="lab"),
                                 check_token=lambda given: given == ADMIN_TOKEN, key=SigningKey.generate(),
                                 clock=now_ms)


def test_the_only_routes_outside_the_role_table_are_the_shell_and_its_files(tmp_path: Path) -> None:
    app = create_app(fake_hub(tmp_path))
    outside = {(getattr(r, "path", ""), type(r).__name__) for r in app.routes if not isinstance(r, APIRoute)}
    assert outside == {("/ui", StarletteRoute.__name__), ("/ui/static", Mount.__name__)}
    assert {path for path, _ in outside} == set(PUBLIC)


def test_a_session_cookie_stands_for_its_token_and_changes_need_the_csrf_token(tmp_path: Path) -> None:
    app = create_app(fake_hub(tmp_path))
    store = TokenStore(tmp_path, lambda given: given == ADMIN_TOKEN)
    _, viewer = store.create("look", "viewer", "admin", NOW)

    async def main() -> None:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
            shell = await client.get("/ui")
            assert shell.status_code == 200 and shell.headers["content-security-policy"] == CSP
            assert "<script type=\"module\" src=\"/ui/static/app.js\">" in shell.text and "<script>" not in shell.text
            static = await client.get("/ui/static/app.js")
            assert static.status_code == 200 and static.headers["x-content-type-options"] == "nosniff"
            assert (await client.get("/ui/session")).status_code == 401
            assert (await client.post("/ui/login", headers={"Authorization": "Bearer wrong"})).status_code == 401
            assert COOKIE not in client.cookies

            login = await client.post("/ui/login", headers={"Authorization": f"Bearer {viewer}"})
            assert login.status_code == 200 and login.json()["role"] == "viewer"
            set_cookie = login.headers["set-cookie"].lower()
            assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "secure" not in set_cookie
            assert viewer not in login.headers["set-cookie"]
            csrf = login.json()["csrf"]
            who = await client.get("/ui/session")  # the cookie alone, no Authorization header
            assert who.status_code == 200 and who.json() == {"name": "look", "role": "viewer", "csrf": csrf,
                                                             "fleet": "lab", "version": who.json()["version"]}
            assert who.headers["cache-control"] == "no-store"
            # Not a read: refused without the CSRF token, before any handler or role check runs.
            refused = await client.post("/runs/r-1/cancel")
            assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["detail"]
            assert refused.headers["content-security-policy"] == CSP
            # With it, the role check decides as for a bearer token (a viewer may not cancel).
            assert (await client.post("/runs/r-1/cancel", headers={"X-CSRF-Token": csrf})).status_code == 403
            assert (await client.get("/events")).status_code == 406  # not a stream request
            out = await client.post("/ui/logout", headers={"X-CSRF-Token": csrf})
            assert out.status_code == 200 and out.json() == {"logged_out": True}
            async with httpx.AsyncClient(transport=transport, base_url="http://hub",
                                         cookies={COOKIE: login.cookies[COOKIE]}) as stale:
                assert (await stale.get("/ui/session")).status_code == 401  # the old cookie ended with its session

            # A revoked token ends its sessions at their next request.
            again = await client.post("/ui/login", headers={"Authorization": f"Bearer {viewer}"})
            assert (await client.get("/ui/session")).status_code == 200
            store.revoke("look")
            assert (await client.get("/ui/session")).status_code == 401 and again.status_code == 200
        async with httpx.AsyncClient(transport=transport, base_url="https://hub") as tls:
            login = await tls.post("/ui/login", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert "secure" in login.headers["set-cookie"].lower()

    asyncio.run(main())
    audit = (tmp_path / "audit.log").read_text()
    assert '"ui.login"' in audit and '"ui.logout"' in audit and viewer not in audit
