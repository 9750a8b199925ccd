"""Crash-only, for every long-running task of the hub: an unexpected exception in any of them (not only the core
loop) logs one CRITICAL line naming the task and stops the hub with `HubTaskFailed` (`hub run` exits 70 on it,
tests/system/test_crash_only.py). The real hub, in process, on the in-memory broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hub.api
import hub.service
from agent.runtime.memory import MemoryBroker, MemoryTransport
from hub.errors import HubTaskFailed
from hub.service import Hub, HubConfig


async def injected(*_: Any) -> None:
    await asyncio.sleep(0)  # fails once running, as a bug met on the way would
    raise RuntimeError("injected fault")


def _broken_app(_hub: Any) -> Any:
    raise RuntimeError("injected fault: no route table")


# task name -> how to break it (on the hub, before it runs)
BREAKS: dict[str, Callable[[Hub, pytest.MonkeyPatch], None]] = {
    "load monitor": lambda h, mp: mp.setattr(h, "_monitor_load", injected),
    "clone reports": lambda h, mp: mp.setattr(hub.service, "report_conflicts", injected),
    "JSON mirror": lambda h, mp: mp.setattr(h.mirror, "run", injected),
    "Sparkplug bridge": lambda h, mp: mp.setattr(h.sparkplug, "run", injected),
    "broker logins": lambda h, mp: mp.setattr(h.broker_clients, "run", injected),
    "core loop": lambda h, mp: mp.setattr(h, "_process", injected),
    "API": lambda h, mp: mp.setattr(hub.api, "create_app", _broken_app),
}


@pytest.mark.parametrize("task", list(BREAKS))
def test_a_failing_task_stops_the_hub(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "fleetflow.hub")

    async def scenario() -> HubTaskFailed:
        transport = MemoryTransport(MemoryBroker(), "hub")
        made = Hub(HubConfig(broker="mqtt://memory.invalid", fleet="t", data=tmp_path / "hub", api_port=0),
                   transport=transport)
        transport.incoming = lambda maxsize=0: made.intake  # as Hub does for MqttTransport
        BREAKS[task](made, monkeypatch)
        with pytest.raises(HubTaskFailed) as failed:
            await asyncio.wait_for(made.run(api=task == "API", first_connection_required=False), 30)
        return failed.value

    failure = asyncio.run(scenario())
    assert failure.task == task
    assert "injected fault" in str(failure) and isinstance(failure.__cause__, RuntimeError)
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and critical[0].startswith(f"the hub's {task} "), critical
    assert "injected fault" in critical[0] and "restart the hub" in critical[0]
    # Stopped for good: its data directory is free for the restart a supervisor makes.
    Hub(HubConfig(broker="mqtt://memory.invalid", fleet="t", data=tmp_path / "hub")).lock.release()


def test_a_request_waiting_on_a_failed_hub_gets_an_internal_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from hub.errors import InternalError
    from hub.events import HubLoadChanged

    async def scenario() -> None:
        transport = MemoryTransport(MemoryBroker(), "hub")
        made = Hub(HubConfig(broker="mqtt://memory.invalid", fleet="t", data=tmp_path / "hub"), transport=transport)
        transport.incoming = lambda maxsize=0: made.intake
        monkeypatch.setattr(made, "_process", injected)
        running = asyncio.create_task(made.run(api=False, first_connection_required=False))
        with pytest.raises(InternalError):
            await asyncio.wait_for(made.request([HubLoadChanged(made.clock(), True, "test")]), 30)
        with pytest.raises(HubTaskFailed):
            await asyncio.wait_for(running, 30)

    asyncio.run(scenario())
