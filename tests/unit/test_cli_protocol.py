"""`fleetflow keys new` and `fleetflow protocol inspect`, run as the installed command."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from tests.cli import fleetflow

ROOT = Path(__file__).resolve().parents[2]
VECTORS = {v["name"]: v for v in json.loads((ROOT / "protocols/vectors/envelopes.json").read_text())}


def test_version() -> None:
    out = fleetflow("--version")
    assert out.returncode == 0 and out.stdout.startswith("fleetflow ")


def test_keys_new_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.key"
    out = fleetflow("keys", "new", str(path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info) == {"kid", "public_key"} and len(bytes.fromhex(info["public_key"])) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Path(f"{path}.pub").read_text().strip() == info["public_key"]
    again = fleetflow("keys", "new", str(path))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert fleetflow("keys", "new", str(path), "--force", "--json").returncode == 0
    assert json.loads(fleetflow("keys", "new", str(path), "--force", "--json").stdout) != info


def test_inspect_verifies_a_valid_vector() -> None:
    v = VECTORS["valid-hb"]
    out = fleetflow("protocol", "inspect", v["envelope_hex"], "--topic", v["topic"], "--public-key",
                    v["public_key_hex"], "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["verified"] is True and result["payload"] == v["payload"]


def test_inspect_without_a_key_shows_the_payload(tmp_path: Path) -> None:
    v = VECTORS["valid-birth"]
    raw = tmp_path / "msg.bin"
    raw.write_bytes(bytes.fromhex(v["envelope_hex"]))
    out = fleetflow("protocol", "inspect", str(raw), "--topic", v["topic"])
    assert out.returncode == 0 and "not checked" in out.stdout and "rpi4" in out.stdout


@pytest.mark.parametrize("name", ["bad-signature-flipped-signature-bit", "wrong-topic-other-node",
                                  "malformed-payload-tag", "too-large-64k"])
def test_inspect_refusal_exits_1_with_the_reason(name: str, tmp_path: Path) -> None:
    v = VECTORS[name]
    hex_file = tmp_path / "msg.hex"  # the too-large vector is over the kernel's limit for one argument
    hex_file.write_text(v["envelope_hex"])
    out = fleetflow("protocol", "inspect", str(hex_file), "--topic", v["topic"], "--public-key", v["public_key_hex"])
    assert out.returncode == 1
    assert v["expect"] in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, says", [
    (["zz-not-hex", "--topic", "t"], "neither a readable file nor hex"),
    (["00", "--topic", "t", "--public-key", "abcd"], "neither 64 hex characters"),
    (["00", "--topic", "t", "--public-key", "ab" * 31], "neither 64 hex characters"),
    ([], "Missing argument"),
])
def test_inspect_usage_errors_exit_2(args: list[str], says: str) -> None:
    out = fleetflow("protocol", "inspect", *args)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


def test_bad_key_file_is_a_usage_error(tmp_path: Path) -> None:
    key = tmp_path / "k.pub"
    key.write_text("zz" * 32)
    out = fleetflow("protocol", "inspect", "00", "--topic", "t", "--public-key", str(key))
    assert out.returncode == 2 and "not hex" in out.stderr and "Traceback" not in out.stderr
