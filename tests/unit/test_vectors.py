"""The committed vectors, checked against our code and against pycose. Nothing here regenerates them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocols import ProtocolError, ReplayWindow, open_envelope
from protocols.messages import BODY_TYPES

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "protocols" / "vectors"
ENVELOPES = json.loads((VECTORS / "envelopes.json").read_text())
REPLAY = json.loads((VECTORS / "replay.json").read_text())
KINDS = {"valid", "bad-signature", "wrong-topic", "malformed", "too-large"}
# pycose ignores bytes after the COSE item; a strict verifier (and fleetflow) refuses them.
PYCOSE_LENIENT = {"malformed-trailing-bytes"}


def _json(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def test_vector_set_covers_every_type_and_every_invalid_kind() -> None:
    expects = {v["expect"] for v in ENVELOPES}
    assert expects == KINDS
    valid_types = {v["payload"]["type"] for v in ENVELOPES if v["expect"] == "valid"}
    assert valid_types == set(BODY_TYPES)
    assert len({v["name"] for v in ENVELOPES}) == len(ENVELOPES)


@pytest.mark.parametrize("vector", ENVELOPES, ids=[v["name"] for v in ENVELOPES])
def test_vector_against_our_code(vector: dict) -> None:
    data = bytes.fromhex(vector["envelope_hex"])
    key = bytes.fromhex(vector["public_key_hex"])
    if vector["expect"] == "valid":
        import cbor2

        message = open_envelope(data, vector["topic"], key)
        assert message.header.type == vector["payload"]["type"]
        assert _json(cbor2.loads(cbor2.loads(data).value[2])) == vector["payload"]
    else:
        with pytest.raises(ProtocolError) as caught:
            open_envelope(data, vector["topic"], key)
        assert caught.value.reason == vector["expect"], str(caught.value)
        assert str(caught.value)  # every refusal says what was wrong


def _pycose_python() -> Path:
    """pycose 1.1.0 cannot decode under cbor2 6, so it lives in its own cached environment with cbor2 5."""
    env = Path(os.environ.get("FLEETFLOW_TEST_CACHE", Path.home() / ".cache" / "fleetflow-tests")) / "pycose"
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "pycose==1.1.0", "cbor2>=5.4,<6"], check=True,
                       timeout=600)
    return python


def test_vectors_against_pycose() -> None:
    out = subprocess.run([str(_pycose_python()), str(ROOT / "tests" / "interop" / "pycose_check.py"),
                          str(VECTORS / "envelopes.json")], capture_output=True, text=True, timeout=300, check=True)
    verdicts = json.loads(out.stdout)
    assert set(verdicts) == {v["name"] for v in ENVELOPES}
    for vector in ENVELOPES:
        name = vector["name"]
        if name in PYCOSE_LENIENT:
            continue
        assert verdicts[name] == vector["cose_valid"], name
    # Every valid vector verifies with an independent implementation.
    assert all(verdicts[v["name"]] for v in ENVELOPES if v["expect"] == "valid")


@pytest.mark.parametrize("case", REPLAY, ids=[c["name"] for c in REPLAY])
def test_replay_vectors(case: dict) -> None:
    window = ReplayWindow(size=case["window"])
    for step in case["steps"]:
        try:
            if step["kind"] == "death":
                window.accept_death(step["boot"])
            else:
                window.accept(step["boot"], step["seq"])
            got = "accept"
        except ProtocolError as exc:
            assert exc.reason == "replayed"
            got = "replayed"
        assert got == step["expect"], step


def test_spec_documents_every_field_of_every_type() -> None:
    """docs/protocol.md is normative: a field added to the code but not to the CDDL fails here."""
    from protocols.messages import describe_types

    spec = (ROOT / "docs" / "protocol.md").read_text()
    for type_name, fields in describe_types().items():
        assert f'"{type_name}"' in spec, type_name
        for key, _, _ in fields:
            assert f'"{key}"' in spec, f"{type_name}.{key} is not in docs/protocol.md"
