"""The agent's update executors on their own: the on-disk install state (`Slots`), resumable downloads, the
install and rollback executors against a local HTTP server, their settings, service.restart through systemd and
health.check, in temporary directories."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from agent.artifacts import ArtifactSettings, Slots, fetch, make_artifact_executors
from agent.config import ConfigError, load_config
from agent.executors import ExecutorPolicy, StepContext, StepFailed, build_executors, update_executors
from agent.services import ServiceSettings, make_health_check, make_service_restart
from protocols.manifest import Manifest, seal_manifest
from tests.httpserver import Served, http_server

HUB = nacl.signing.SigningKey(bytes(range(32)))
NODE = nacl.signing.SigningKey(bytes(32))
CTX = StepContext("r1", "s1", "a1", 1, 30.0)


def manifest_for(data: bytes, version: str, url: str | None = None, name: str = "demo",
                 file: str = "app.py") -> Manifest:
    return Manifest(name, version, hashlib.sha256(data).hexdigest(), len(data), file, 1, url)


def settings_for(root: Path, hub_url: str | None) -> ArtifactSettings:
    return ArtifactSettings(root, "f", "n1", NODE, lambda: (bytes(HUB.verify_key),), hub_url,
                            backoff=(0.01, 0.05), read_timeout=10)


def run(executor: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(executor(inputs, CTX))  # type: ignore[no-any-return]


def fill(text: str) -> Any:
    def place(staging: Path) -> None:
        (staging / "app.py").write_text(text)
    return place


# -- the on-disk state -----------------------------------------------------------------------------------------------

def test_versions_switch_keep_one_previous_and_roll_back_once(tmp_path: Path) -> None:
    slots = Slots(tmp_path, "demo")
    assert (slots.current(), slots.previous()) == (None, None)
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        slots.stage(version, b"m", fill(version))
        slots.switch(version)
    assert (slots.current(), slots.previous()) == ("1.2.0", "1.1.0")
    assert sorted(p.name for p in slots.dir.iterdir()) == ["1.1.0", "1.2.0", "current", "previous"]  # 1.0.0 pruned
    assert (slots.current_link / "app.py").read_text() == "1.2.0"
    assert slots.rollback() == ("1.2.0", "1.1.0")
    assert (slots.current(), slots.previous()) == ("1.1.0", None)
    with pytest.raises(StepFailed, match="no previous version to go back to \\(current: 1.1.0\\)"):
        slots.rollback()
    assert slots.current() == "1.1.0"


def test_a_switch_interrupted_between_its_two_links_is_finished_by_the_next(tmp_path: Path) -> None:
    slots = Slots(tmp_path, "demo")
    slots.stage("1.0.0", b"m", fill("a"))
    slots.switch("1.0.0")
    slots.stage("2.0.0", b"m", fill("b"))
    slots._point(slots.previous_link, "1.0.0")  # the crash came after `previous`, before `current`
    assert (slots.current(), slots.previous()) == ("1.0.0", "1.0.0")
    assert slots.switch("2.0.0") == "1.0.0"
    assert (slots.current(), slots.previous()) == ("2.0.0", "1.0.0")


def test_a_failed_staging_leaves_nothing_and_never_replaces_the_running_version(tmp_path: Path) -> None:
    slots = Slots(tmp_path, "demo")
    slots.stage("1.0.0", b"m", fill("a"))
    slots.switch("1.0.0")

    def broken(staging: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        slots.stage("2.0.0", b"m", broken)
    with pytest.raises(StepFailed, match="installed with other bytes"):
        slots.stage("1.0.0", b"m", fill("other"))
    assert sorted(p.name for p in slots.dir.iterdir()) == ["1.0.0", "current"]
    assert (slots.current_link / "app.py").read_text() == "a"


# -- downloads -------------------------------------------------------------------------------------------------------

def test_a_download_cut_mid_way_resumes_from_where_it_stopped(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    served = Served(files={"/blob": data}, cut_after={"/blob": 100_000})
    with http_server(served) as base:
        manifest = manifest_for(data, "1.0.0", f"{base}/blob")
        download = fetch(settings_for(tmp_path, None), manifest, threading.Event(), 3)
    assert download.part.read_bytes() == data
    assert download.resumed_at == [100_000]
    assert served.ranges("/blob") == [None, "bytes=100000-"]


def test_wrong_bytes_from_the_mirror_are_dropped_and_the_hub_serves_the_right_ones(tmp_path: Path) -> None:
    data = b"the right bytes" * 1000
    manifest = manifest_for(data, "1.0.0")
    served = Served(files={"/mirror": b"X" * len(data), f"/artifacts/{manifest.sha256}": data})
    with http_server(served) as base:
        manifest = manifest_for(data, "1.0.0", f"{base}/mirror")
        download = fetch(settings_for(tmp_path, base), manifest, threading.Event(), 4)
        assert download.part.read_bytes() == data
        served.files[f"/artifacts/{manifest.sha256}"] = b"Y" * len(data)
        download.part.unlink()
        with pytest.raises(StepFailed, match=f"the bytes from the hub {base} have sha256 .* the manifest says "
                                             f"{manifest.sha256}; nothing was installed or switched"):
            fetch(settings_for(tmp_path, base), manifest, threading.Event(), 4)
    assert not download.part.exists()


# -- the executors ---------------------------------------------------------------------------------------------------

def hub_with(served: Served, data: bytes, version: str) -> Manifest:
    manifest = manifest_for(data, version)
    served.files[f"/artifacts/{manifest.sha256}"] = data
    return manifest


def test_install_switches_only_after_the_signature_and_the_hash_check_out(tmp_path: Path) -> None:
    served = Served()
    v1, v2 = hub_with(served, b"print(1)\n", "1.0.0"), hub_with(served, b"print(2)\n", "1.1.0")
    with http_server(served) as base:
        install, rollback = make_artifact_executors(settings_for(tmp_path, base)).values()
        out = run(install, {"artifact": "demo@1.0.0", "manifest": seal_manifest(v1, HUB).hex()})
        assert (out["version_before"], out["version"], out["source"]) == (None, "1.0.0", "downloaded")
        out = run(install, {"artifact": "demo@1.1.0", "manifest": seal_manifest(v2, HUB).hex()})
        assert (out["version_before"], out["version"]) == ("1.0.0", "1.1.0")
        requests = len(served.requests)
        slots = Slots(tmp_path, "demo")

        other_key = nacl.signing.SigningKey(bytes(range(2, 34)))
        v3 = hub_with(served, b"print(3)\n", "1.2.0")
        signed = seal_manifest(v3, HUB)
        for manifest, problem in ((seal_manifest(v3, other_key), "not a hub key this node trusts"),
                                  (signed[:-1] + bytes([signed[-1] ^ 1]), "signature does not verify")):
            with pytest.raises(StepFailed, match=f"manifest refused: .*{problem}.*nothing was installed or switched"):
                run(install, {"manifest": manifest.hex()})
        assert len(served.requests) == requests  # refused before a byte was fetched
        served.files[f"/artifacts/{v3.sha256}"] = b"print(6)\n"  # as long, other bytes
        with pytest.raises(StepFailed, match="have sha256"):
            run(install, {"manifest": signed.hex()})
        assert (slots.current(), slots.previous()) == ("1.1.0", "1.0.0")
        assert (slots.current_link / "app.py").read_text() == "print(2)\n"

        assert run(rollback, {"artifact": "demo@1.1.0"}) == {"artifact": "demo", "version_before": "1.1.0",
                                                            "version": "1.0.0", "changed": True}
        # a retried compensation finds it done
        assert run(rollback, {"artifact": "demo@1.1.0"})["changed"] is False
        assert (slots.current_link / "app.py").read_text() == "print(1)\n"
        again = run(install, {"manifest": seal_manifest(v1, HUB).hex()})  # installed already: no download
        assert again["source"] == "installed already" and len(served.requests) == requests + 1


def test_install_unpacks_a_tar_archive_and_refuses_one_that_escapes(tmp_path: Path) -> None:
    def tar(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(content), 0o755
                archive.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    served = Served()
    good = hub_with(served, tar({"bin/run": b"#!/bin/sh\necho hi\n"}), "1.0.0")
    bad = hub_with(served, tar({"../../escape": b"x"}), "1.0.1")  # out of .staging-*/ and demo/
    with http_server(served) as base:
        install = make_artifact_executors(settings_for(tmp_path, base))["artifact.install"]
        run(install, {"manifest": seal_manifest(good, HUB).hex(), "unpack": True})
        assert os.access(tmp_path / "demo" / "current" / "bin" / "run", os.X_OK)
        with pytest.raises(StepFailed, match="cannot unpack it"):
            run(install, {"manifest": seal_manifest(bad, HUB).hex(), "unpack": True})
    assert not (tmp_path / "escape").exists() and Slots(tmp_path, "demo").current() == "1.0.0"


def test_update_executors_are_off_until_the_config_enables_them(tmp_path: Path) -> None:
    base = {"broker": "mqtt://127.0.0.1:1", "fleet": "f", "node_id": "n1", "data": str(tmp_path)}
    config = load_config(base, env={})
    enabled, disabled = build_executors(ExecutorPolicy(**update_executors(config, NODE, lambda: ())))
    assert disabled >= {"artifact.install", "artifact.rollback", "service.restart", "health.check"}
    file = tmp_path / "agent.toml"
    file.write_text('[artifacts]\nenabled = true\nhub_url = "http://hub:8470/"\n[service]\nenabled = true\n'
                    'supervise = ["demo = python3 app.py --port 9"]\n[health]\nenabled = true\nallow = ["http://*"]\n')
    config = load_config(base, file, env={})
    assert (config.artifacts_hub_url, config.service_supervise) == ("http://hub:8470", ("demo = python3 app.py --port 9",))
    enabled, disabled = build_executors(ExecutorPolicy(**update_executors(config, NODE, lambda: ())))
    assert {"artifact.install", "artifact.rollback", "service.restart", "health.check"} <= set(enabled)
    for text, problem in (('[service]\nsupervise = ["demo ="]\n', "the command is empty"),
                          ('[service]\nsupervise = ["../x = run"]\n', "expected NAME = COMMAND"),
                          ('[artifacts]\nhub_url = "ftp://hub"\n', "http:// or https://")):
        file.write_text(text)
        with pytest.raises(ConfigError, match=f"agent.toml:2\\): .*{problem}"):
            load_config(base, file, env={})


def test_service_restart_uses_systemctl_where_systemd_runs_and_the_unit_is_allowed(tmp_path: Path) -> None:
    bin_dir, marker, calls = tmp_path / "bin", tmp_path / "systemd", tmp_path / "calls"
    bin_dir.mkdir()
    marker.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$3" = broken.service ] && exit 3\n'
                                       'exit 0\n')
    (bin_dir / "systemctl").chmod(0o755)
    settings = ServiceSettings(tmp_path, tmp_path / "services", units=("plant-*",), systemd_marker=marker)
    restart = make_service_restart(settings)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old_path}"
    try:
        assert run(restart, {"service": "plant-app.service"}) == {"service": "plant-app.service",
                                                                  "manager": "systemd"}
        with pytest.raises(StepFailed, match="'other.service' is not a service this agent may restart"):
            run(restart, {"service": "other.service"})
        marker.rmdir()  # systemd is not running: an allowed unit cannot be restarted either
        with pytest.raises(StepFailed, match="systemd is not running here"):
            run(restart, {"service": "plant-app.service"})
    finally:
        os.environ["PATH"] = old_path
    assert calls.read_text().splitlines() == ["restart -- plant-app.service"]


def test_health_check_probes_until_healthy_within_its_bounds(tmp_path: Path) -> None:
    served = Served(status={"/health": 503})
    check = make_health_check(("http://127.0.0.1:*/health",))
    with http_server(served) as base:
        with pytest.raises(StepFailed, match=r"not healthy after 3 attempt\(s\) in .* s: HTTP 503"):
            run(check, {"http": f"{base}/health", "attempts": 3, "interval": 0.01})
        assert len(served.ranges("/health")) == 3

        def recover() -> None:
            served.status["/health"] = 200
        threading.Timer(0.3, recover).start()
        out = run(check, {"http": f"{base}/health", "attempts": 200, "interval": 0.05, "within": 60})
        assert out["healthy"] and out["attempts"] > 1
        with pytest.raises(StepFailed, match="not on this agent's health_allow list"):
            run(check, {"http": f"{base}/other"})
    with pytest.raises(StepFailed, match=r"/bin/false not healthy after 2 attempt\(s\).*exited with 1"):
        run(make_health_check(("/bin/false",)), {"argv": ["/bin/false"], "attempts": 2, "interval": 0})
