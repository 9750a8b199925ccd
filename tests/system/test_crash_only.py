"""Crash-only processes: an unexpected error in the hub's core loop or the agent's session loop stops the process
with exit code 70 and one clear log line, and the restart (what a supervisor does) loses nothing."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.waiting import wait

ONE_STEP = """
name: one-step
version: 1.0.0
steps:
  - id: only
    uses: echo
    with: {v: 1}
"""

# Runs `fleetflow` with one fault injected first: the hub's first attempt to apply an accepted result raises, after
# the batch's facts are journaled and before any of them is applied or acknowledged: the worst moment.
HUB_FAULT = """
import sys
import hub.service as service
real = service.apply_logged
crashed = []
def faulty(core, fact):
    if not crashed and type(fact).__name__ == "ResultReported":
        crashed.append(fact)
        raise RuntimeError("injected fault")
    return real(core, fact)
service.apply_logged = faulty
from agent.cli import main
main(sys.argv[1:])
"""

# The agent's session loop fails the first time it takes an acknowledgement off its outbox. `agent run` normally
# execs a lean daemon process (which would not carry the fault): here the daemon's code runs in the same process.
AGENT_FAULT = """
import logging
import sys
import agent.commands as commands
from agent.daemon import run_agent
from agent.outbox import Outbox
real = Outbox.remove
crashed = []
def faulty(self, eids):
    if not crashed:
        crashed.append(eids)
        raise RuntimeError("injected fault")
    return real(self, eids)
Outbox.remove = faulty
def in_process(config, log_level):
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_agent(config))
commands.exec_daemon = in_process
from agent.cli import main
main(sys.argv[1:])
"""

RETRIED = """
name: retried
version: 1.0.0
steps:
  - id: nap
    uses: sleep
    with: {seconds: 1}
    retry: {max_attempts: 3, initial: 0.2}
"""


def test_a_core_loop_failure_stops_the_hub_and_its_restart_loses_nothing(mosquitto: Broker, tmp_path: Path) -> None:
    faulty = HubProcess(mosquitto, "crash", tmp_path / "hub", command=(sys.executable, "-c", HUB_FAULT)).start()
    agent = faulty.agent("n1")
    try:
        faulty.wait_nodes(1)
        run_id = faulty.submit(ONE_STEP)
        assert faulty.proc is not None
        wait(lambda: faulty.proc is not None and faulty.proc.poll() is not None, 30, "the faulty hub to stop")
        assert faulty.proc.returncode == 70, faulty.log()[-2000:]
        log = faulty.log()
        assert "CRITICAL fleetflow.hub: the hub's core loop failed on a batch" in log, log[-2000:]
        assert "injected fault" in log
        # What a supervisor does: start it again on the same data directory, the same agent still running.
        hub = HubProcess(mosquitto, "crash", tmp_path / "hub").start()
        hub.agents.append(agent)
        try:
            run = hub.wait_run(run_id, 40)
            assert run["state"] == "succeeded", run
            assert [a["state"] for s in run["steps"] for a in s["attempts"]] == ["succeeded"]
            # The device's own evidence: the step ran once, and its result was acknowledged (nothing left to send).
            assert agent.log().count(f"step only of run {run_id} succeeded") == 1, agent.log()[-2000:]
        finally:
            hub.stop()
    finally:
        faulty.stop()


def test_a_session_loop_failure_stops_the_agent_and_its_restart_loses_nothing(mosquitto: Broker,
                                                                                tmp_path: Path) -> None:
    with HubProcess(mosquitto, "crash", tmp_path / "hub") as hub:
        agent = AgentProcess(mosquitto, "crash", "n1", tmp_path / "n1" / "data", hub.public_key,
                             ("--heartbeat", "0.5"), command=(sys.executable, "-c", AGENT_FAULT)).start()
        hub.agents.append(agent)
        hub.wait_nodes(1)
        run_id = hub.submit(RETRIED)
        wait(lambda: agent.proc is not None and agent.proc.poll() is not None, 30, "the faulty agent to stop")
        assert agent.proc is not None and agent.proc.returncode == 70, agent.log()[-2000:]
        log = agent.log()
        assert "CRITICAL fleetflow.agent: the agent's session loop failed" in log and "injected fault" in log, log[-2000:]
        restarted = hub.agent("n1")  # what the service manager does: the same data directory, outbox and all
        run = hub.wait_run(run_id, 60)
        assert run["state"] == "succeeded", run
        assert [a["state"] for s in run["steps"] for a in s["attempts"]].count("succeeded") == 1
        # The device's own log (both processes write it): the step succeeded there exactly once.
        assert restarted.log().count(f"step nap of run {run_id} succeeded") == 1, restarted.log()[-3000:]
