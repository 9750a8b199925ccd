"""The API's large answers are encoded off the event loop, where the hub ingests messages (hub/api.py
`encoded_off_loop`): which thread encodes is observed, not timed, so the test holds on a busy machine."""

from __future__ import annotations

import asyncio
import json
import threading
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub import api
from hub.api import create_app, node_view
from hub.events import NodeBorn
from hub.limits import Limits
from hub.protocol import NodeView
from hub.state import Core
from protocols import Heartbeat


class _Registry:
    def all(self) -> list[dict[str, Any]]:
        return []

    def get(self, node_id: str) -> None:
        return None


def _hub(tmp_path: Path, nodes: int) -> types.SimpleNamespace:
    core = Core()
    views: dict[str, NodeView] = {}
    for i in range(nodes):
        node = f"n{i:04d}"
        core.apply(NodeBorn(1_000, node, 1, "rpi4", {"site": "a" if i % 2 else "b"}, ("echo",), 2, {"cores": 4.0},
                            (), 5.0))
        views[node] = NodeView(Heartbeat(running=1, rejected={"busy": 2}), {"cpu": 12.5, "temp": float("nan")}, 900)
    return types.SimpleNamespace(config=types.SimpleNamespace(limits=Limits(), data=tmp_path, fleet="f"),
                                 check_token=lambda t: t == "s", core=core, registry=_Registry(), views=views,
                                 clock=lambda: 2_000)


@pytest.mark.parametrize("path", ["/nodes", "/nodes?label=site=a", "/ui/fleet"])
def test_the_fleet_answers_are_encoded_in_a_worker_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          path: str) -> None:
    hub = _hub(tmp_path, 300)
    encoded_in: list[threading.Thread] = []
    render = api.SafeJSONResponse.render

    def spy(self: api.SafeJSONResponse, content: Any) -> bytes:
        encoded_in.append(threading.current_thread())
        return render(self, content)

    monkeypatch.setattr(api.SafeJSONResponse, "render", spy)

    async def main() -> tuple[httpx.Response, threading.Thread]:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(hub)),  # type: ignore[arg-type]
                                   base_url="http://hub", headers={"Authorization": "Bearer s"})
        async with client:
            return await client.get(path), threading.current_thread()

    response, loop_thread = asyncio.run(main())
    assert response.status_code == 200, response.text
    assert encoded_in and loop_thread not in encoded_in
    if path.startswith("/nodes"):  # the answer is what it was when FastAPI encoded it on the loop
        shown = [node_view(hub, n) for n in sorted(hub.core.nodes)]  # type: ignore[arg-type]
        if "label" in path:
            shown = [v for v in shown if v["labels"] == {"site": "a"}]
        expected = json.loads(api.SafeJSONResponse(shown).body)
        assert response.json() == expected
        assert len(expected) == (150 if "label" in path else 300)
        assert expected[0]["telemetry"] == {"cpu": 12.5, "temp": None}  # NaN, as JSON has it
        assert expected[0]["heartbeat"]["rejected"] == {"busy": 2}


def test_the_api_schema_still_shows_what_get_nodes_returns(tmp_path: Path) -> None:
    schema = create_app(_hub(tmp_path, 1)).openapi()["paths"]["/nodes"]["get"]["responses"]["200"]
    assert schema["content"]["application/json"]["schema"]["type"] == "array"
