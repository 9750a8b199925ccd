"""Agent pieces without a broker: config sources, identity, outbox, executors, runner admission and recovery."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.executors import ExecutorPolicy, StepContext, StepFailed, build_executors, run_sleep
from agent.identity import Identity, IdentityError
from agent.outbox import Outbox, RunningAttempt
from agent.runtime.profiles import ProfileError, load_profile
from agent.runner import Runner
from protocols import Assign, AttemptRef

REQUIRED = {"broker": "mqtt://127.0.0.1:1", "fleet": "f", "node_id": "n1", "data": "/tmp/x"}


# --- config -----------------------------------------------------------------------------------------------------

def test_flags_win_over_environment_over_file(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('fleet = "from-file"\nprofile = "rpi4"\nheartbeat = 9\n[labels]\nsite = "north"\n'
                    '[shell]\nenabled = true\nallow = ["/bin/echo"]\n')
    env = {"FLEETFLOW_FLEET": "from-env", "FLEETFLOW_HEARTBEAT": "3", "FLEETFLOW_PASSWORD": "pw"}
    config = load_config({**REQUIRED, "fleet": None, "heartbeat": 1.5}, file, env)
    assert config.fleet == "from-env" and config.heartbeat == 1.5 and config.profile == "rpi4"
    assert config.labels == {"site": "north"} and config.shell and config.shell_allow == ("/bin/echo",)
    assert config.password == "pw"


@pytest.mark.parametrize("flags, env, text, says", [
    ({"node_id": "bad id"}, {}, "", "--node-id: 'bad id' is not a valid id"),
    ({}, {"FLEETFLOW_HEARTBEAT": "-1"}, "", "heartbeat (from environment): must be greater than 0"),
    ({}, {}, "keepalive = 'x'", "keepalive (from config file"),
    ({}, {}, "colour = 'blue'", "unknown setting 'colour'"),
    ({}, {}, "fleet = [", "config file"),
    ({"broker": "http://x:1"}, {}, "", "scheme must be mqtt:// or mqtts://"),
    ({"labels": ["novalue"]}, {}, "", "label 'novalue' must be key=value"),
    ({"hub_key": "abc"}, {}, "", "--hub-key: public key 'abc'"),
    ({"password": "pw"}, {}, "", "not accepted on the command line"),
])
def test_bad_settings_name_the_setting_and_source(tmp_path: Path, flags: dict, env: dict, text: str,
                                                  says: str) -> None:
    file = tmp_path / "agent.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config({**REQUIRED, **flags}, file, env)
    assert says in str(caught.value)


def test_missing_settings_are_listed() -> None:
    with pytest.raises(ConfigError, match="--fleet .*--data"):
        load_config({"broker": "mqtt://h:1", "node_id": "n"}, None, {})


# --- identity and profiles --------------------------------------------------------------------------------------

def test_identity_boot_counter_and_ownership(tmp_path: Path) -> None:
    identity = Identity.open(tmp_path / "d", "n1", "f")
    assert stat.S_IMODE((tmp_path / "d" / "node.key").stat().st_mode) == 0o600
    assert [identity.next_boot(), identity.next_boot()] == [1, 2]
    key = identity.public_key
    identity.close()
    again = Identity.open(tmp_path / "d")
    assert again.boot == 2 and again.public_key == key and again.node_id == "n1"
    again.close()
    with pytest.raises(IdentityError, match="belongs to node_id 'n1'"):
        Identity.open(tmp_path / "d", "n2", "f")
    os.chmod(tmp_path / "d" / "node.key", 0o644)
    with pytest.raises(Exception, match="accessible by other users"):
        Identity.open(tmp_path / "d")


def test_unknown_profile_lists_the_known_ones() -> None:
    assert load_profile("rpi4").max_concurrent >= 1
    with pytest.raises(ProfileError, match="available: .*container.*rpi4"):
        load_profile("toaster")


# --- outbox -----------------------------------------------------------------------------------------------------

def test_outbox_keeps_events_sheds_telemetry_and_survives_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=3000, reserve_bytes=1000)
    for i in range(40):
        box.add_telemetry({"metrics": {f"m{k}": float(i) for k in range(10)}, "at": i}, i)
    assert box.used_bytes <= 2000 and box.counter("shed") > 0
    kept = [e.body["at"] for e in box.pending()]
    assert kept == list(range(40 - len(kept), 40))  # the oldest went first
    eids = [box.add_event("result", {"run": "r", "n": i, "pad": "x" * 200}, i) for i in range(10)]
    assert box.used_bytes > 2000 and not box.has_room_for_new_work()  # events go over the limit, never dropped
    kinds = [e.kind for e in box.pending()]
    assert kinds.count("evt") == 10
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite", max_bytes=3000, reserve_bytes=1000)
    assert [e.eid for e in reopened.pending() if e.kind == "evt"] == eids
    assert reopened.remove(eids + [999_999]) == 10 and reopened.has_room_for_new_work()
    assert reopened.counter("shed") > 0  # the counter is durable


# --- executors and runner ---------------------------------------------------------------------------------------

def test_dangerous_executors_are_off_by_default() -> None:
    enabled, disabled = build_executors(ExecutorPolicy())
    assert {"noop", "sleep", "echo", "fail"} == set(enabled)
    assert disabled == {"shell", "python", "artifact.install", "artifact.rollback", "service.restart", "health.check"}


def test_sleep_rejects_bad_input() -> None:
    ctx = StepContext("r", "s", "a", 1, 10)
    with pytest.raises(StepFailed, match="seconds"):
        asyncio.run(run_sleep({"seconds": "soon"}, ctx))


def test_python_executor_allowlist(tmp_path: Path) -> None:
    enabled, _ = build_executors(ExecutorPolicy(python=True, python_allow=("json:dumps",)))
    ctx = StepContext("r", "s", "a", 1, 10)
    out = asyncio.run(enabled["python"]({"function": "json:dumps", "args": {"obj": [1]}}, ctx))
    assert out == {"value": "[1]"}
    with pytest.raises(StepFailed, match="not on this agent's python allowlist"):
        asyncio.run(enabled["python"]({"function": "os:system", "args": {"command": "true"}}, ctx))


def make_runner(tmp_path: Path, slots: int = 1) -> tuple[Runner, Outbox]:
    box = Outbox(tmp_path / "o.sqlite")
    enabled, disabled = build_executors(ExecutorPolicy())
    return Runner(box, enabled, disabled, slots, lambda: int(time.time() * 1000)), box


def refusals(box: Outbox) -> list[str]:
    return [e.body.get("reason") for e in box.pending() if e.body.get("event") == "refused"]


def test_runner_admission_and_fences(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, box = make_runner(tmp_path)
        assert runner.assign(Assign("r", "s", "a2", 2, "sleep", {"seconds": 5}, 30)) is None
        assert runner.assign(Assign("r", "s", "a1", 1, "echo", {}, 30)) == "stale-fence"
        assert runner.assign(Assign("r", "t", "b1", 1, "echo", {}, 30)) == "busy"
        assert runner.assign(Assign("r", "t", "b2", 1, "shell", {}, 30)) == "executor-disabled"
        assert runner.assign(Assign("r", "t", "b3", 1, "warp", {}, 30)) == "unknown-executor"
        # a newer fence for the same step supersedes the running attempt
        assert runner.assign(Assign("r", "s", "a3", 3, "echo", {"v": 3}, 30)) is None
        for _ in range(100):
            if not runner.running:
                break
            await asyncio.sleep(0.01)
        events = [(e.body.get("attempt"), e.body.get("event") or ("ok" if e.body.get("ok") else "failed"))
                  for e in box.pending()]
        assert ("a2", "cancelled") in events and ("a3", "ok") in events
        runner.draining = True
        assert runner.assign(Assign("r", "u", "c1", 1, "echo", {}, 30)) == "draining"
        assert refusals(box) == ["stale-fence", "busy", "executor-disabled", "unknown-executor", "draining"]
        assert runner.assign(Assign("r", "s", "a3", 3, "echo", {"v": 3}, 30)) is None  # a repeat is ignored
        assert len([e for e in box.pending() if e.body.get("attempt") == "a3" and "ok" in e.body]) == 1

    asyncio.run(scenario())


def test_recovery_kills_leftover_process_groups_and_reports_them(tmp_path: Path) -> None:
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        box = Outbox(tmp_path / "o.sqlite")
        box.start_attempt(RunningAttempt("a1", "r", "s", 4, leftover.pid), 0)
        box.close()
        runner, box = make_runner(tmp_path)
        lost = runner.recover()
        assert [a.attempt for a in lost] == ["a1"]
        assert leftover.wait(timeout=5) == -9
        results = [e.body for e in box.pending() if e.type == "result"]
        assert results[0]["attempt"] == "a1" and results[0]["ok"] is False and "interrupted" in results[0]["error"]
        assert box.running_attempts() == []
    finally:
        leftover.kill()


def test_cancel_ignores_other_fences(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, box = make_runner(tmp_path)
        runner.assign(Assign("r", "s", "a5", 5, "sleep", {"seconds": 5}, 30))
        assert runner.cancel((AttemptRef("r", "s", "a5", 4),), "old") == 0  # names an older fence: not ours
        assert "a5" in runner.running
        assert runner.cancel((AttemptRef("r", "s", "a5", 5),), "now") == 1
        for _ in range(200):  # bounded: the sleep step is cancelled well before its 5 s
            if "a5" not in runner.running:
                break
            await asyncio.sleep(0.01)
        assert "a5" not in runner.running
        cancelled = [e.body for e in box.pending() if e.body.get("event") == "cancelled"]
        assert [(c["attempt"], c["fence"]) for c in cancelled] == [("a5", 5)]

    asyncio.run(scenario())


def test_shipped_config_example_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "agent" / "install" / "agent.toml.example"
    # the example points at /etc/fleetflow/hub.pub, which a test machine does not have: give the key inline
    text = example.read_text().replace('"/etc/fleetflow/hub.pub"', '"' + "ab" * 32 + '"')
    copy = tmp_path / "agent.toml"
    copy.write_text(text)
    config = load_config({}, copy, {})
    assert config.profile == "rpi4" and config.labels == {"line": "2", "site": "north"} and not config.shell


def test_overlay_source_drives_reported_metrics(tmp_path: Path) -> None:
    from agent.telemetry import FixedSource, OverlaySource

    overlay = tmp_path / "tel.json"
    source = OverlaySource(FixedSource(cpu=10.0, temp=40.0), str(overlay))
    assert source.sample() == {"cpu": 10.0, "temp": 40.0}  # no file: no overlay
    overlay.write_text('{"temp": 85, "flag": true, "name": "x"}')
    assert source.sample() == {"cpu": 10.0, "temp": 85.0}
    overlay.write_text("{broken")
    assert source.sample()["temp"] == 40.0


def test_a_key_that_is_not_32_bytes_of_hex_is_refused_naming_it(tmp_path: Path) -> None:
    from agent.runtime.keys import KeyFileError, load_key, parse_public_key

    key = tmp_path / "node.key"
    for text, says in (("zz" * 32, "is not hex"), ("ab" * 31, "has 31 bytes; an Ed25519 key has 32")):
        key.write_text(text + "\n")
        os.chmod(key, 0o600)
        with pytest.raises(KeyFileError, match=f"key file {key} {says}"):
            load_key(key)
        with pytest.raises(KeyFileError, match=says):
            parse_public_key(str(key))  # a public key given as a file


_STEPS = '''
import asyncio


async def swallows():
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return {"partial": True}


async def fails_to_close():
    try:
        await asyncio.sleep(30)
    finally:
        raise ConnectionError("could not close the device handle")
'''


@pytest.mark.parametrize("function", ["swallows", "fails_to_close"])
def test_a_cancelled_attempt_is_reported_cancelled_whatever_its_step_does_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str) -> None:
    """A python step that catches its cancellation and returns, or whose cleanup raises: the hub cancelled the
    attempt, so the agent says `cancelled` and sends no result (a result, even a success, would be a lie)."""
    (tmp_path / "ffsteps_cancel.py").write_text(_STEPS)
    monkeypatch.syspath_prepend(str(tmp_path))

    async def scenario() -> None:
        enabled, disabled = build_executors(ExecutorPolicy(python=True, python_allow=("ffsteps_cancel:*",)))
        box = Outbox(tmp_path / "outbox.sqlite")
        runner = Runner(box, enabled, disabled, 1, lambda: int(time.time() * 1000))
        runner.assign(Assign("r", "s", "a1", 1, "python", {"function": f"ffsteps_cancel:{function}"}, 30))
        for _ in range(200):  # bounded: until the step is waiting in its sleep
            await asyncio.sleep(0.01)
            if any(e.body.get("event") == "started" for e in box.pending()):
                break
        assert runner.cancel((AttemptRef("r", "s", "a1", 1),), "cancelled by the hub") == 1
        for _ in range(500):
            if "a1" not in runner.running:
                break
            await asyncio.sleep(0.01)
        assert "a1" not in runner.running
        sent = [(e.type, e.body.get("event")) for e in box.pending()]
        assert ("step", "cancelled") in sent
        assert not [t for t, _ in sent if t == "result"], sent

    asyncio.run(scenario())
