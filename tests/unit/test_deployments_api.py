"""The deployments' API and CLI in process: odd request bodies are a 422 naming the field (never a 500), the list is
bounded and builds only the summaries it answers, an archived deployment still shows, and pause, resume and cancel
print in the format asked for. The hub behind the API is its real core (tests/unit/deploydriver.py)."""

from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nacl.signing import SigningKey
from typer.testing import CliRunner

from agent.runtime.clock import now_ms
from hub import deployment_commands
from hub.api import create_app
from hub.deployments import api as deployments_api
from hub.deployments import core as deployments_core
from hub.deployments.views import detail
from hub.limits import Limits
from hub.state import Core
from tests.unit.deploydriver import DEP, fleet, workflow

TOKEN = "the-admin-token"


def answer(tmp_path: Path, core: Core, method: str, path: str, body: Any = None) -> httpx.Response:
    """One request to the hub's app, whose `deploy` and controls do nothing but answer."""
    async def deploy(spec: Any, actor: str) -> str:
        return "d-0000000000"

    hub = types.SimpleNamespace(config=types.SimpleNamespace(limits=Limits(), data=tmp_path),
                                check_token=lambda given: given == TOKEN, key=SigningKey.generate(), clock=now_ms,
                                core=core, registry=types.SimpleNamespace(all=lambda: []), deploy=deploy)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(create_app(hub), raise_app_exceptions=False)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://hub",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            return await client.request(method, path, json=body)
    return asyncio.run(call())


@pytest.mark.parametrize("extra, field", [
    ({"verify": 1e308}, "--verify"), ({"in_progress_timeout": "9" * 400}, "--in-progress-timeout"),
    ({"timeout": "9" * 400 + "s"}, "--timeout"), ({"waves": 5}, "--waves"), ({"waves": [True]}, "--waves"),
    ({"target": 5}, "--target"), ({"window": "x"}, "--window"), ({"window": [5]}, "--window"),
    ({"cron": 5}, "--cron"), ({"pause_between": "no"}, "--pause-between"), ({"retries": 1.5}, "--retries"),
])
def test_an_odd_body_is_refused_naming_its_field(tmp_path: Path, extra: dict[str, Any], field: str) -> None:
    response = answer(tmp_path, Core(), "POST", "/deployments", {"workflow": workflow(), "target": ["all"], **extra})
    assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}: "), response.text


def test_the_list_is_bounded_and_builds_only_what_it_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = fleet(1)
    for n in range(5):
        d.deploy(f"d-000000000{n}", workflow=workflow(f"1.0.{n}"), verify="0s")
        d.run_for(500)
    built: list[str] = []

    def summary(dep: Any) -> dict[str, Any]:
        built.append(dep.id)
        return {"id": dep.id}

    monkeypatch.setattr(deployments_api, "summary", summary)
    listed = answer(tmp_path, d.core, "GET", "/deployments?limit=2")
    assert listed.json() == [{"id": "d-0000000004"}, {"id": "d-0000000003"}] and built == ["d-0000000004",
                                                                                          "d-0000000003"]
    for limit in (-1, 0, 1001, "x"):
        refused = answer(tmp_path, d.core, "GET", f"/deployments?limit={limit}")
        assert refused.status_code == 422 and "limit" in refused.text, (limit, refused.text)


def test_an_archived_deployment_is_listed_and_shown_as_its_summary(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployments_core, "RETAIN_ENDED", 1)
    d = fleet(1)
    for n in range(3):
        d.deploy(f"d-000000000{n}", workflow=workflow(f"1.0.{n}"), verify="0s")
        d.run_for(500)
    listed = answer(tmp_path, d.core, "GET", "/deployments").json()
    assert [(s["id"], s["archived"]) for s in listed] == [("d-0000000002", False), ("d-0000000001", True),
                                                          ("d-0000000000", True)]
    assert [s["id"] for s in answer(tmp_path, d.core, "GET", "/deployments?limit=2").json()] == [
        "d-0000000002", "d-0000000001"]
    shown = answer(tmp_path, d.core, "GET", "/deployments/d-0000000000").json()
    assert (shown["state"], shown["archived"], shown["executions"], shown["counts"]) == (
        "succeeded", True, [], {"succeeded": 1})


@pytest.mark.parametrize("action, args", [("pause", []), ("resume", []), ("cancel", ["--force"])])
def test_pause_resume_and_cancel_print_in_the_format_asked_for(monkeypatch: pytest.MonkeyPatch, action: str,
                                                               args: list[str]) -> None:
    d = fleet(1)
    d.deploy(verify="60s")
    d.run_for(500)
    shown = json.loads(json.dumps(detail(d.dep())))
    asked: list[tuple[str, str, Any]] = []

    class Hub:
        def __init__(self, *given: Any) -> None:
            pass

        def call(self, method: str, path: str, json: Any = None) -> Any:
            asked.append((method, path, json))
            return shown

    monkeypatch.setattr(deployment_commands, "Client", Hub)
    runner = CliRunner()
    for output, read in (("json", json.loads), ("yaml", yaml.safe_load)):
        printed = runner.invoke(deployment_commands.deployments_app, [action, DEP, *args, "-o", output])
        assert printed.exit_code == 0 and read(printed.output) == shown, printed.output
    table = runner.invoke(deployment_commands.deployments_app, [action, DEP, *args])
    assert table.output == f"{DEP} running: {shown['reason']}\n"
    wide = runner.invoke(deployment_commands.deployments_app, [action, DEP, *args, "-o", "wide"])
    assert wide.output.startswith(f"deployment {DEP}  app 1.0.0  running")
    assert asked[0] == ("POST", f"/deployments/{DEP}/{action}",
                        {"reason": "", **({"force": True} if args else {})})
