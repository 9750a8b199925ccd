"""The hub's HTTP API as a fuzz target: request bodies and paths into the real FastAPI app of a real `Hub` (its own
temporary data directory, its core loop running, no broker: the hub retries 127.0.0.1:1 in the background), in
process through httpx's ASGI transport. Any 5xx, or an exception out of the app, is a crash.

Requests change the hub (nodes added, runs submitted), so one input's answer can depend on those before it; a
crash still reproduces alone in almost every case, and its traceback says where.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fuzz_inputs as gen
import httpx
import yaml
from fuzz_protocol import NODE_KEY
from fuzz_targets import CBOR, Target, workflow_objects, workflow_texts

IDS = ("n1", "n2", "hub", "a" * 64, "a" * 65, "a/b", "a b", "..", ".", "%2F", "\u00e9", "x" * 300, "", "-", "n1?x=1",
       "n1#f", "\x00", "nodes", "accept-all")
KEY_HEX = bytes(NODE_KEY.verify_key).hex()


class ServerError(Exception):
    """The API answered 5xx: a bug, never a refusal."""


class _Api:
    """One hub per worker process, created on first use."""

    def __init__(self) -> None:
        from hub.api import create_app
        from hub.service import Hub, HubConfig

        logging.disable(logging.CRITICAL)  # broker retries and refusals would flood the table
        self.dir = tempfile.mkdtemp(prefix="hub-")  # under the run's scratch directory (fuzz.py removes it)
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.hub = Hub(HubConfig(broker="mqtt://127.0.0.1:1", fleet="fuzz", data=Path(self.dir) / "hub"))
        self.task = self.loop.create_task(self.hub.run(api=False, first_connection_required=False))
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(self.hub)), base_url="http://hub",
                                        headers={"Authorization": f"Bearer {self.hub.token}"})
        self.loop.run_until_complete(asyncio.sleep(0.05))  # let the core loop start
        self.runs: list[str] = []  # ids of the runs submitted so far, newest last

    def request(self, method: str, path: str, content_type: str | None, body: bytes) -> httpx.Response:
        headers = {"Content-Type": content_type} if content_type else {}
        return self.loop.run_until_complete(self.client.request(method, path, content=body, headers=headers))


_api: _Api | None = None


def _json(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _path_id(rng: random.Random) -> str:
    return quote(gen.pick(rng, IDS) if rng.random() < 0.8 else gen.text(rng, 10), safe="")


def _run_id(rng: random.Random) -> str:
    """Half the time the newest run this hub made (filled in when the request is sent), else any id."""
    return LATEST_RUN if rng.random() < 0.5 else _path_id(rng)


LATEST_RUN = "{latest-run}"


def _submission(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.4:
        workflow: Any = gen.mutate_value(rng, gen.pick(rng, workflow_objects()), donors=workflow_objects(),
                                         json_only=True)
    elif roll < 0.6:
        workflow = gen.mutate_text(rng, gen.pick(rng, workflow_texts()), workflow_texts(), gen.YAML_SNIPPETS)
    elif roll < 0.75:
        workflow = gen.pick(rng, workflow_objects())
    elif roll < 0.85:
        workflow = yaml.safe_dump(gen.pick(rng, workflow_objects()))
    else:
        workflow = gen.value(rng, 3, json_only=True)
    inputs: Any = {} if rng.random() < 0.5 else gen.value(rng, 3, json_only=True)
    if isinstance(inputs, dict) and rng.random() < 0.5:
        inputs.update({gen.pick(rng, ("limit", "threshold", "rehearse_failure", "x")): gen.scalar(rng, True)})
    body: Any = {"workflow": workflow, "inputs": inputs}
    if rng.random() < 0.15:
        body = gen.mutate_value(rng, body, json_only=True)
    return body


def api_input(rng: random.Random) -> list[Any]:
    """[method, path, content type, body]: mostly the routes that parse bodies, with wrong types, wrong JSON, and
    hostile ids in the path."""
    roll = rng.random()
    content_type: str | None = "application/json"
    if roll < 0.45:
        method, path, body = "POST", "/runs", _json(_submission(rng))
        if rng.random() < 0.1:
            path += f"?x={_path_id(rng)}"
    elif roll < 0.6:
        doc = {"id": gen.pick(rng, IDS), "public_key": KEY_HEX if rng.random() < 0.4 else gen.pick(
            rng, ("", "zz" * 32, KEY_HEX[:62], KEY_HEX + "00", "0" * 64, KEY_HEX.upper(), " " + KEY_HEX, "\u0660" * 64))}
        method, path, body = "POST", "/nodes", _json(gen.mutate_value(rng, doc, json_only=True) if rng.random() < 0.3
                                                     else doc)
    elif roll < 0.8:
        action = gen.pick(rng, ("accept", "reject", "revoke", "drain"))
        verb: Any = ({"kid": gen.pick(rng, ("0" * 16, KEY_HEX, "g" * 16, "", 5))} if action == "accept"
                    else {"on": gen.scalar(rng, True)} if action == "drain" else gen.value(rng, 1, json_only=True))
        method, path, body = "POST", f"/nodes/{_path_id(rng)}/{action}", _json(verb)
    elif roll < 0.88:
        method, path, body = "POST", f"/runs/{_run_id(rng)}/{gen.pick(rng, ('cancel', 'fail'))}", _json(
            {"reason": gen.scalar(rng, True)} if rng.random() < 0.7 else gen.value(rng, 2, json_only=True))
    elif roll < 0.94:
        method, path, body = gen.pick(rng, ("DELETE", "GET")), f"/nodes/{_path_id(rng)}?force={gen.pick(rng, ('true', '1', 'x', ''))}", b""
        content_type = None
    else:
        method, path, body = "GET", gen.pick(rng, (f"/runs?limit={gen.pick(rng, ('-1', '0', '99999999999999999999', 'x'))}",
                                                  f"/nodes?label={_path_id(rng)}", f"/runs/{_run_id(rng)}", "/health")), b""
        content_type = None
    if body and rng.random() < 0.15:
        body = gen.mutate_bytes(rng, body, [])
    if body and rng.random() < 0.05:
        content_type = gen.pick(rng, (None, "text/plain", "application/json; charset=latin-1", "multipart/form-data"))
    return [method, path, content_type, body]


def api_request(item: list[Any]) -> str:
    global _api
    if _api is None:
        _api = _Api()
    method, path, content_type, body = item
    response = _api.request(method, path.replace(LATEST_RUN, _api.runs[-1] if _api.runs else "r-none"),
                            content_type, body)
    if response.status_code >= 500:
        raise ServerError(f"HTTP {response.status_code} for {method} {path[:80]}: {response.text[:300]}")
    if response.status_code == 201 and path == "/runs":
        _api.runs.append(response.json()["id"])
    return f"HTTP {response.status_code}"


def api_target() -> Target:
    return Target("api", "the hub's HTTP API: POST /runs, POST /nodes, node and run actions (real Hub, in process)",
                  api_input, api_request, (), CBOR, weight=0.7)
