"""The core's half of a message an ingest worker opened (hub/clones.py `admit_verified`): the key must still be
trusted, the replay window judges it, and a message the reorder buffer released late is never accepted; and what a
worker could not open (a key it had not heard of yet) the core opens, counts and orders with the rest."""

from __future__ import annotations

import collections
from types import SimpleNamespace
from typing import Any

import nacl.signing
import pytest

from hub.clones import CloneWatch
from hub.health import Policy
from hub.ingest import ArrivedLate
from hub.ingest.worker import Batch, open_message
from hub.ingest.workers import IngestWorkers
from protocols import Birth, Heartbeat, Keyring, Outgoing, Receiver, Replayed, Signer, UnknownKey, kid_for

FLEET = "plant"
KEY = nacl.signing.SigningKey(b"\x09" * 32)
KID = kid_for(bytes(KEY.verify_key))


def watch() -> CloneWatch:
    return CloneWatch(FLEET, Keyring([("n1", bytes(KEY.verify_key))]))


def opened(out: Outgoing, worker: Receiver) -> tuple[object, bytes]:
    return worker.open(out.topic, out.payload, 0), out.payload


def heartbeat(signer: Signer, at: int) -> Outgoing:
    return signer.seal(Heartbeat(0, 1, 0, 0, {}, False), at)


def test_a_worker_opened_message_is_refused_once_its_key_is_no_longer_trusted() -> None:
    core, worker, signer = watch(), watch(), Signer(KEY, FLEET, "n1", boot=1)
    message, data = opened(heartbeat(signer, 1_000), worker)
    core.keyring.remove_owner("n1")  # revoked between the worker's check and the core's
    with pytest.raises(UnknownKey):
        core.admit_verified(message, KID, data, 1_000)  # type: ignore[arg-type]
    assert "n1" not in core.windows


def test_a_late_message_the_window_would_take_is_refused_and_leaves_the_window_alone() -> None:
    core, worker, signer = watch(), watch(), Signer(KEY, FLEET, "n1", boot=1)
    first, second, third = (opened(heartbeat(signer, at), worker) for at in (1_000, 1_001, 1_002))
    core.admit_verified(first[0], KID, first[1], 1_000)  # type: ignore[arg-type]
    core.admit_verified(third[0], KID, third[1], 1_002)  # type: ignore[arg-type]
    with pytest.raises(ArrivedLate):
        core.admit_verified(second[0], KID, second[1], 1_003, late=True)  # type: ignore[arg-type]
    assert core.windows["n1"].mark() == (1, 3, False)
    core.windows["n1"].check(1, 2)  # seq 2 still unseen: never accepted out of order


def test_a_late_duplicate_is_refused_as_a_replay_and_read_by_the_clone_watch() -> None:
    core, worker, signer = watch(), watch(), Signer(KEY, FLEET, "n1", boot=3)
    born = signer.seal(Birth("rpi4", "0.1.0", {}, ("noop",), (), 0, 1, 5.0, 10.0, {"cores": 4.0}), 2_000)
    message, data = opened(born, worker)
    core.admit_verified(message, KID, data, 2_000)  # type: ignore[arg-type]
    assert core.births["n1"][:2] == (3, 1)
    clone = Signer(KEY, FLEET, "n1", boot=3)  # a second device with the same identity: another birth, same seq
    other, other_data = opened(clone.seal(Birth("rpi4", "0.2.0", {}, ("noop",), (), 0, 1, 5.0, 10.0, {}), 2_100),
                               worker)
    with pytest.raises(Replayed):
        core.admit_verified(other, KID, other_data, 2_100, late=True)  # type: ignore[arg-type]
    assert "n1" in core.found  # evidence, as from the single-process path


def test_ingest_workers_is_a_setting_like_the_others() -> None:
    from hub.config import ConfigError, load_hub_settings

    required = {"broker": "mqtt://127.0.0.1:1", "fleet": "f", "data": "/tmp/fleetflow-ingest-test"}
    assert load_hub_settings(required, None, {}).ingest_workers == 0
    settings = load_hub_settings(required, None, {"FLEETFLOW_INGEST_WORKERS": "2"})
    assert settings.hub_config(Policy()).ingest_workers == 2
    with pytest.raises(ConfigError, match="ingest_workers .from environment.: must be an integer from 0 to 64"):
        load_hub_settings(required, None, {"FLEETFLOW_INGEST_WORKERS": "-1"})



class TakenIn:
    """The hub's intake as the core's side of the workers sees it: what was offered, in order."""

    backlog_ms = 0

    def __init__(self) -> None:
        self.offered: list[tuple[str, Any]] = []

    def offer(self, topic: str, payload: bytes, opened: Any = None, at: int | None = None) -> bool:
        self.offered.append((topic, opened))
        return True


def test_what_a_worker_could_not_open_the_core_opens_counts_and_orders_with_the_rest() -> None:
    signer = Signer(KEY, FLEET, "n1", boot=1)
    first, second = heartbeat(signer, 1_000), heartbeat(signer, 1_001)
    enroll_topic = f"fleetflow/v1/{FLEET}/node/n2/enroll"
    intake = TakenIn()
    hub = SimpleNamespace(receiver=Receiver(FLEET, Keyring([("n1", bytes(KEY.verify_key))])), intake=intake,
                          protocol=SimpleNamespace(refused=collections.Counter()), clock=lambda: 2_000)
    workers = IngestWorkers(hub, 0)  # type: ignore[arg-type]  # the core's half alone: no processes
    # A worker that knows the key sends seq 2 opened; seq 1 came to one that did not, and it sends it on unopened.
    opened_second = open_message(hub.receiver, second.topic, second.payload, 1_001)
    assert opened_second is not None
    workers._take(None, Batch(opened=[opened_second]))  # type: ignore[arg-type]
    assert intake.offered == [] and workers.opened_here == 0  # seq 2 waits for seq 1
    unopened = [(first.topic, first.payload, 1_000), (enroll_topic, b"request", 1_002)]
    workers._take(None, Batch(unopened=unopened))  # type: ignore[arg-type]
    assert workers.opened_here == 1  # seq 1, opened here; the enroll request goes to the intake as it came
    assert [(topic, opened and opened.message.header.seq) for topic, opened in intake.offered] == [
        (enroll_topic, None), (first.topic, 1), (second.topic, 2)]
