"""The agent-only install, as a device without internet does it (README, docs/operations.md "Offline install"):
a wheel of this checkout plus the agent's dependencies as wheels in one directory, installed with --no-index into a
fresh venv, NO extras. Then every agent command works against Mosquitto and a real hub, and the hub's commands say
which extra they need.

No network here: the project wheel is built with --no-build-isolation, and the dependencies come from .wheelhouse/,
which tests/run.sh makes before pytest (the install step, where the network is allowed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protocols import Birth, Topic, open_envelope
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.waiting import wait
from tests.wire import Observer

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / ".wheelhouse"
SOURCES = ("pyproject.toml", "README.md", "protocols", "agent", "hub", "sim", "firmware-profiles")
FLEET = "inst"

pytestmark = pytest.mark.slow


def offline_env() -> dict[str, str]:
    """No pip configuration (this machine's adds indexes and find-links), no PYTHONPATH: only what we pass counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def run(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=offline_env(), capture_output=True, text=True,
                          timeout=timeout)



@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding fleetflow without extras, installed offline from a wheelhouse."""
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.skip(f"{WHEELHOUSE} holds no wheels: tests/run.sh makes it (pip wheel of the agent's dependencies)")
    work = tmp_path_factory.mktemp("install")
    source = work / "src"  # a copy: building in the checkout would write build/ and *.egg-info next to others' work
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    wheelhouse = work / "wheelhouse"
    shutil.copytree(WHEELHOUSE, wheelhouse)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                wheelhouse, source, cwd=work)
    assert built.returncode == 0, built.stdout + built.stderr
    venv = work / "venv"
    made = run(sys.executable, "-m", "venv", venv, cwd=work)
    assert made.returncode == 0, made.stderr
    # The documented offline install, word for word but for the paths.
    done = run(venv / "bin" / "pip", "install", "--no-index", "--find-links", wheelhouse, "fleetflow", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    probe = run(venv / "bin" / "python", "-c", "import importlib.util as u; print([m for m in ('yaml', 'fastapi', "
                "'uvicorn', 'prometheus_client', 'apscheduler', 'httpx', 'amqtt') if u.find_spec(m)])", cwd=work)
    assert probe.stdout.strip() == "[]", f"an extra's library was installed: {probe.stdout}"
    return venv / "bin"


def test_every_agent_command_works_without_extras(installed: Path, mosquitto: Broker, tmp_path: Path) -> None:
    fleetflow = installed / "fleetflow"
    version = run(fleetflow, "--version", cwd=tmp_path)
    assert (version.returncode, version.stdout.strip(), version.stderr) == (0, "fleetflow 0.1.0", "")

    keys = run(fleetflow, "keys", "new", tmp_path / "op.key", "--json", cwd=tmp_path)
    assert keys.returncode == 0 and (tmp_path / "op.key.pub").exists(), keys.stderr
    profiles = run(fleetflow, "profiles", "list", cwd=tmp_path)
    assert profiles.returncode == 0 and "rpi4" in profiles.stdout, profiles.stderr

    # The hub's commands are listed, and say which extra they need (exit 2, one line, nothing written).
    assert "hub" in run(fleetflow, "--help", cwd=tmp_path).stdout
    hub_run = run(fleetflow, "hub", "run", "--broker", mosquitto.url, "--fleet", FLEET, "--data", tmp_path / "h",
                  cwd=tmp_path)
    assert hub_run.returncode == 2, hub_run.stdout + hub_run.stderr
    assert hub_run.stderr == "error: the hub commands need the hub extra: pip install 'fleetflow[hub]'\n"
    assert not (tmp_path / "h").exists()

    # agent run: connects (its birth is on the wire, signed with its key), then SIGTERM ends it cleanly.
    observer = Observer(mosquitto, f"fleetflow/v1/{FLEET}/node/+/birth")
    hub = HubProcess(mosquitto, FLEET, tmp_path / "hub").start()
    data = tmp_path / "dev1"
    log = (tmp_path / "dev1.log").open("wb")
    agent = subprocess.Popen([str(fleetflow), "agent", "run", "--broker", mosquitto.url, "--fleet", FLEET,
                              "--node-id", "dev1", "--data", str(data), "--hub-key", hub.public_key,
                              "--heartbeat", "0.5"], cwd=tmp_path, env=offline_env(), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        births = wait(lambda: observer.on("/node/dev1/birth"), 30, "the agent's birth")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, (tmp_path / "dev1.log").read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
        log.close()
        observer.close()
        hub.stop()
    identity = run(fleetflow, "agent", "identity", "--data", data, "--json", cwd=tmp_path)
    assert identity.returncode == 0, identity.stderr
    key = bytes.fromhex(json.loads(identity.stdout)["public_key"])
    birth = open_envelope(births[0], Topic.node(FLEET, "dev1", "birth").value, key)
    assert isinstance(birth.body, Birth)
    assert "connected as dev1" in (tmp_path / "dev1.log").read_text()
    inspect = run(fleetflow, "protocol", "inspect", births[0].hex(), "--topic",
                  Topic.node(FLEET, "dev1", "birth").value, "--public-key", key.hex(), cwd=tmp_path)
    assert inspect.returncode == 0 and "verified" in inspect.stdout, inspect.stdout + inspect.stderr
