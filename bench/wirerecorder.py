"""A third party on the wire for benchmarks: a separate process that timestamps every message on some topics.

    recorder = WireRecorder(broker, "fleetflow/v1/b/node/+/cmd", "fleetflow/v1/b/node/+/evt", workdir=tmp).start()
    ...
    records = recorder.stop("fleetflow/v1/b/node/end/evt")    # [Record(at, topic, fields)], in arrival order

Its own process, so neither the GIL of the bench (submitting work, parsing answers) nor the hub's can delay a
timestamp. Times are `time.monotonic()` seconds, the system-wide CLOCK_MONOTONIC, so they compare with the bench's
own `time.monotonic()`; each also carries the wall clock (`time.time()`), to compare with what the hub
journals. Payloads are opened without a signature check (`fields` is the decoded payload map): the
recorder watches what was sent, the hub and the agents are what checks it. Nothing is decoded while recording.

    python bench/wirerecorder.py PORT OUT FILTER...     # what `start` runs: prints `ready` once subscribed,
                                                       # writes OUT and exits when its stdin closes
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocols import ProtocolError, cbor, envelope  # noqa: E402
from tests.brokers import HOST, Broker  # noqa: E402

READY_S = 30.0
END_KIND = "wire-recorder-end"  # the node id of the marker `stop` publishes: everything before it has arrived


@dataclass(frozen=True, slots=True)
class Record:
    at: float                  # time.monotonic() when the recorder's process received it
    wall: float                # time.time() then: to set beside the hub's own times (its journal, ms since the epoch)
    topic: str
    fields: dict[str, Any]     # the decoded payload map ({} for a payload that is not an envelope)


class WireRecorder:
    def __init__(self, broker: Broker, *filters: str, workdir: Path) -> None:
        self.broker, self.filters = broker, filters
        self.out = workdir / f"wire-{id(self)}.cbor"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> WireRecorder:
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.broker.port), str(self.out), *self.filters],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(READY_S)
        if not ready or ready[0].strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the wire recorder did not subscribe within {READY_S:g} s")
        return self

    def stop(self, marker_topic: str) -> list[Record]:
        """Stop recording once a marker published now on `marker_topic` (a topic it records) has arrived, so
        whatever the broker took before it is in; every message recorded, decoded, the marker left out."""
        assert self.proc is not None and self.proc.stdin is not None
        from tests.wire import Publisher

        publisher = Publisher(self.broker)
        try:
            publisher.publish_all([(marker_topic, END_KIND.encode())], qos=1)
        finally:
            publisher.close()
        self.proc.stdin.close()
        if self.proc.wait(timeout=120) != 0:
            raise RuntimeError(f"the wire recorder failed (exit {self.proc.returncode})")
        raw = cbor2.loads(self.out.read_bytes())
        return [Record(at, wall, topic, _fields(payload)) for at, wall, topic, payload in raw]


def _fields(payload: bytes) -> dict[str, Any]:
    try:
        value = cbor.loads(envelope.parse(payload).payload)
    except ProtocolError:  # a retained empty state, or anything else that is not ours: kept, with no fields
        return {}
    return value if isinstance(value, dict) else {}


def _record(port: int, out: Path, filters: list[str]) -> None:
    import paho.mqtt.client as mqtt

    seen: list[tuple[float, float, str, bytes]] = []
    subscribed, ended = threading.Event(), threading.Event()
    marker = END_KIND.encode()

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        if message.payload == marker:
            ended.set()
        else:
            seen.append((time.monotonic(), time.time(), message.topic, message.payload))

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"wire-recorder-{out.stem}")
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in filters])
    client.connect(HOST, port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(READY_S):
        sys.exit(f"no SUBACK from 127.0.0.1:{port} within {READY_S:g} s")
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes our stdin, once it has published the marker
    if not ended.wait(READY_S):
        sys.exit(f"the end marker did not arrive within {READY_S:g} s")
    client.loop_stop()
    client.disconnect()
    out.write_bytes(cbor2.dumps(seen))


if __name__ == "__main__":
    _record(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
