"""Artifact manifests and fetch requests (protocols/manifest.py), and the hub's store and resolution
(hub/artifacts/): signing, verifying, what a tampered byte does, immutable versions, key rotation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cbor2
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.artifacts import ArtifactConflict, ArtifactError, ArtifactNotFound, ArtifactStore, resolve_artifacts
from protocols import BadSignature, Malformed, ProtocolError, UnknownKey, open_envelope
from protocols.manifest import (FetchRequest, Manifest, open_manifest, peek_fetch, peek_manifest, seal_fetch,
                                seal_manifest, verify_fetch)

HUB = nacl.signing.SigningKey(bytes(range(32)))
OTHER = nacl.signing.SigningKey(bytes(range(1, 33)))
HUB_PUB = bytes(HUB.verify_key)
MANIFEST = Manifest("demo", "1.2.0", "ab" * 32, 1234, "app.py", 1_700_000_000_000, "https://cdn.example/demo")


def test_a_signed_manifest_verifies_and_reads_back_with_the_hub_key() -> None:
    signed = seal_manifest(MANIFEST, HUB)
    assert open_manifest(signed, [HUB_PUB]) == MANIFEST
    assert peek_manifest(signed) == (MANIFEST, signed[8:16])
    assert open_manifest(signed, [bytes(OTHER.verify_key), HUB_PUB]) == MANIFEST  # during a key rotation


def test_another_key_a_flipped_signature_and_a_changed_field_are_refused() -> None:
    signed = seal_manifest(MANIFEST, HUB)
    with pytest.raises(UnknownKey, match="not a hub key this node trusts"):
        open_manifest(seal_manifest(MANIFEST, OTHER), [HUB_PUB])
    flipped = signed[:-1] + bytes([signed[-1] ^ 1])
    with pytest.raises(BadSignature):
        open_manifest(flipped, [HUB_PUB])
    # the size field's value, changed in place: the bytes are still a well-formed manifest, the signature is not
    changed = signed.replace((1234).to_bytes(2, "big"), (1235).to_bytes(2, "big"))
    assert changed != signed and peek_manifest(changed)[0].size == 1235
    with pytest.raises(BadSignature):
        open_manifest(changed, [HUB_PUB])


def test_a_manifest_signature_is_no_message_signature_and_a_fetch_request_no_manifest() -> None:
    """Each is bound to its own external_aad: neither verifies as the other."""
    signed = seal_manifest(MANIFEST, HUB)
    with pytest.raises(ProtocolError):
        open_envelope(signed, "fleetflow/v1/f/hub/state", HUB_PUB)
    fetch = seal_fetch(FetchRequest("f", "n1", "ab" * 32), HUB)
    with pytest.raises(BadSignature):
        open_manifest(fetch, [HUB_PUB])


@pytest.mark.parametrize("field, value, problem", [
    ("name", "..", "name"), ("name", "a/b", "name"), ("version", "1.2", "semantic"), ("sha256", "AB" * 32, "sha256"),
    ("file", "../app", "file"), ("file", ".hidden", "file"), ("url", "ftp://x/y", "url"),
    ("url", "https://user:pw@x/y", "credentials"), ("size", -1, "size")])
def test_a_bad_field_is_refused_naming_it(field: str, value: object, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        dataclasses.replace(MANIFEST, **{field: value})


def test_a_manifest_with_an_unknown_or_missing_field_is_malformed() -> None:
    with pytest.raises(Malformed, match="unknown field"):
        Manifest.from_map({**MANIFEST.to_map(), "run": "rm -rf /"})
    raw = MANIFEST.to_map()
    del raw["sha256"]
    with pytest.raises(Malformed, match="sha256"):
        Manifest.from_map(raw)


names = st.from_regex(r"\A[A-Za-z0-9_-][A-Za-z0-9_.-]{0,20}\Z")
versions = st.tuples(*[st.integers(0, 10**6)] * 3).map(lambda t: ".".join(map(str, t)))


@settings(max_examples=60, deadline=None)
@given(name=names, version=versions, sha=st.binary(min_size=32, max_size=32), size=st.integers(0, 2**40),
       created=st.integers(0, 2**45), url=st.none() | st.just("https://m.example/x"))
def test_every_valid_manifest_roundtrips_and_is_encoded_one_way(name: str, version: str, sha: bytes, size: int,
                                                               created: int, url: str | None) -> None:
    manifest = Manifest(name, version, sha.hex(), size, "f.bin", created, url)
    signed = seal_manifest(manifest, HUB)
    assert open_manifest(signed, [HUB_PUB]) == manifest
    payload = cbor2.loads(signed).value[2]
    assert payload == cbor2.dumps(cbor2.loads(payload), canonical=True)  # deterministic (RFC 8949 4.2.1)


def test_a_fetch_request_verifies_only_with_the_node_key_it_claims() -> None:
    node = nacl.signing.SigningKey(bytes(32))
    fetch, parsed = peek_fetch(seal_fetch(FetchRequest("f", "n1", "cd" * 32), node))
    assert fetch == FetchRequest("f", "n1", "cd" * 32)
    verify_fetch(parsed, bytes(node.verify_key))
    with pytest.raises(UnknownKey):
        verify_fetch(parsed, HUB_PUB)


# -- the hub's store -----------------------------------------------------------------------------------------------

def store_with(tmp_path: Path, content: bytes = b"print('v1')\n") -> tuple[ArtifactStore, Path, list]:
    keys = [HUB]
    store = ArtifactStore(tmp_path / "artifacts", lambda: keys[-1])
    source = tmp_path / "app.py"
    source.write_bytes(content)
    return store, source, keys


def test_an_added_file_is_stored_by_its_hash_with_a_signed_manifest(tmp_path: Path) -> None:
    store, source, _ = store_with(tmp_path)
    stored, created = store.add_file(source, "demo", "1.0.0", None, 5)
    assert created and stored.manifest.file == "app.py" and stored.manifest.size == source.stat().st_size
    assert store.blob(stored.manifest.sha256).read_bytes() == source.read_bytes()  # type: ignore[union-attr]
    assert open_manifest(stored.signed, [HUB_PUB]) == stored.manifest
    assert [s.manifest.ref for s in store.list()] == ["demo@1.0.0"]
    assert store.add_file(source, "demo", "1.0.0", None, 9) == (stored, False)  # the same bytes again: as stored
    source.write_bytes(b"print('other')\n")
    with pytest.raises(ArtifactConflict, match="exists with other bytes"):
        store.add_file(source, "demo", "1.0.0", None, 9)
    assert store.blob("../../hub.key") is None and store.blob("00" * 32) is None
    assert not list(store.incoming.iterdir())  # nothing left behind


def test_resolution_gives_install_steps_the_signed_manifest_and_names_what_is_wrong(tmp_path: Path) -> None:
    store, source, _ = store_with(tmp_path)
    stored, _ = store.add_file(source, "demo", "1.0.0", None, 5)
    spec = {"name": "up", "steps": [
        {"id": "get", "uses": "artifact.install", "with": {"artifact": "demo@1.0.0"},
         "compensate": {"uses": "artifact.rollback", "with": {"artifact": "demo@1.0.0"}}},
        {"id": "other", "uses": "echo", "with": {"artifact": "not resolved"}}]}
    resolved = resolve_artifacts(spec, store)
    assert resolved["steps"][0]["with"] == {"artifact": "demo@1.0.0", "manifest": stored.signed.hex()}
    assert resolved["steps"][1] == spec["steps"][1] and "manifest" not in spec["steps"][0]["with"]
    with pytest.raises(ArtifactNotFound, match=r"steps\[0\] \(get\).with.artifact: no artifact demo@2.0.0 "
                                                r"\(known versions: 1.0.0\)") as caught:
        resolve_artifacts({"steps": [{"id": "get", "uses": "artifact.install", "with": {"artifact": "demo@2.0.0"}}]},
                          store)
    assert caught.value.status == 404
    for inputs, problem in (({}, "needs the artifact"), ({"artifact": "demo"}, "NAME@VERSION"),
                            ({"artifact": "demo@1.0.0", "manifest": "00"}, "not both")):
        with pytest.raises(ArtifactError, match=problem):
            resolve_artifacts({"steps": [{"id": "s", "uses": "artifact.install", "with": inputs}]}, store)
    given_manifest = {"steps": [{"id": "s", "uses": "artifact.install", "with": {"manifest": "00ff"}}]}
    assert resolve_artifacts(given_manifest, store) == given_manifest  # passed on: the node verifies it


def test_after_a_key_rotation_a_manifest_is_signed_again_only_for_the_bytes_it_names(tmp_path: Path) -> None:
    store, source, keys = store_with(tmp_path)
    stored, _ = store.add_file(source, "demo", "1.0.0", None, 5)
    keys.append(OTHER)  # the hub switched keys
    signed = store.for_run("demo", "1.0.0")
    assert open_manifest(signed, [bytes(OTHER.verify_key)]) == stored.manifest
    assert store.get("demo", "1.0.0").signed == signed  # kept, so the blob is hashed once per rotation
    keys.append(HUB)
    blob = store.blob(stored.manifest.sha256)
    assert blob is not None
    blob.write_bytes(b"print('evil')\n")  # changed on disk since it was signed
    with pytest.raises(ArtifactError, match="blob is missing or changed"):
        store.for_run("demo", "1.0.0")


def test_a_stored_manifest_changed_on_disk_is_refused_at_submission(tmp_path: Path) -> None:
    store, source, _ = store_with(tmp_path)
    store.add_file(source, "demo", "1.0.0", None, 5)
    path = store.manifests / "demo" / "1.0.0.cose"
    signed = path.read_bytes()
    path.write_bytes(signed[:-1] + bytes([signed[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="does not verify with the hub key"):
        store.for_run("demo", "1.0.0")


def test_the_normative_spec_names_every_field_and_both_signing_contexts() -> None:
    spec = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    from protocols.manifest import FETCH_AAD, MANIFEST_AAD

    for key in [*MANIFEST.to_map(), *FetchRequest("f", "n", "00" * 32).to_map()]:
        assert f'"{key}"' in spec, f"{key} is not in docs/protocol.md section 12"
    assert f'"{MANIFEST_AAD}"' in spec and f'"{FETCH_AAD}"' in spec
