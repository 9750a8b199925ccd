"""The operator CLI explains itself, end to end: the real `fleetflow` command against a real hub process, a real
agent and Mosquitto. Output formats, piped tables, watches ended by Ctrl-C, progress of `--wait`, the validate gate
of `run submit`, why a step waits (in `run show` and in the API), and the hub's and agent's log lines."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.brokers import Broker
from tests.hubprocess import HubProcess

FLEETFLOW = str(Path(sys.executable).parent / "fleetflow")
LONG = "a-label-value-longer-than-any-terminal-" + "x" * 120  # a piped table must print it whole

GPU = """
name: needs-gpu
version: 1.0.0
steps:
  - id: train
    uses: echo
    placement: {selector: {capabilities: [gpu]}}
"""

TWO = """
name: two
version: 1.0.0
steps:
  - id: a
    uses: sleep
    with: {seconds: 1}
  - id: b
    uses: echo
    with: {v: 2}
    needs: [a]
"""

# `fleetflow validate` rejects it (the run's timeout is shorter than its step's), the hub would take it
TOO_SHORT = """
name: too-short
version: 1.0.0
timeout: 100
steps:
  - id: a
    uses: echo
    timeout: 300
"""


NAP = """
name: nap
version: 1.0.0
steps:
  - id: nap
    uses: sleep
    with: {seconds: 2}
"""


def calm(directory: Path) -> tuple[str, str]:
    """Agent flags that report a calm machine, whatever this one's load: health changes are not what these tests
    are about, and an unhealthy node would take no work."""
    path = directory / "telemetry.json"
    path.write_text(json.dumps({"cpu": 5, "mem": 10, "disk": 10}))
    return ("--telemetry-file", str(path))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEETFLOW, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One hub and one agent (no gpu) for the module: each test adds its own runs."""
    root = tmp_path_factory.mktemp("cli")
    broker = Broker("mosquitto", root / "broker").start()
    process = HubProcess(broker, "cli", root / "hub")
    try:
        process.start()
        process.agent("n1", "--label", f"note={LONG}", *calm(root))
        process.wait_nodes(1)
        yield process
    finally:
        process.stop()
        broker.stop()


def data(hub: HubProcess) -> tuple[str, str]:
    return ("--data", str(hub.data))


def workflow(tmp_path: Path, text: str, name: str = "wf.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_run_show_and_the_api_say_why_a_step_waits(hub: HubProcess, tmp_path: Path) -> None:
    out = cli("run", "submit", workflow(tmp_path, GPU), *data(hub))
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    why = "no online node matches selector {capabilities: [gpu]}"
    step = hub.wait(lambda: (s := hub.get(f"/runs/{run_id}")["steps"][0])["waiting"] and s, 10, "a waiting reason")
    assert step["state"] == "queued" and step["waiting"].startswith(why), step
    shown = cli("run", "show", run_id, *data(hub))
    assert shown.returncode == 0, shown.stderr
    assert f"waiting: {why}" in shown.stdout
    assert json.loads(cli("run", "show", run_id, "-o", "json", *data(hub)).stdout)["steps"][0]["waiting"].startswith(why)
    # --wait prints the reason on stderr as progress; stdout keeps only the verdict
    waited = cli("run", "submit", workflow(tmp_path, GPU), "--wait", "--timeout", "2", *data(hub))
    assert waited.returncode == 1 and waited.stdout == ""
    assert f"step train: waiting: {why}" in waited.stderr and "still running after 2 s" in waited.stderr
    for id_ in [run_id, *(r["id"] for r in hub.get("/runs") if r["state"] == "running")]:
        hub.post(f"/runs/{id_}/cancel", {"reason": "test over"})


def test_output_formats_and_piped_tables_keep_every_cell_whole(hub: HubProcess, tmp_path: Path) -> None:
    out = cli("run", "submit", workflow(tmp_path, TWO), "--wait", *data(hub))
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split()[0]

    as_json = json.loads(cli("nodes", "list", "-o", "json", *data(hub)).stdout)
    alias = json.loads(cli("nodes", "list", "--json", *data(hub)).stdout)  # --json is -o json
    assert [n["id"] for n in alias] == [n["id"] for n in as_json] == ["n1"] and alias[0]["kid"] == as_json[0]["kid"]
    node = as_json[0]
    assert node["id"] == "n1" and node["labels"]["note"] == LONG and isinstance(node["last_seen"], int)
    as_yaml = yaml.safe_load(cli("nodes", "list", "-o", "yaml", *data(hub)).stdout)
    assert as_yaml[0]["id"] == "n1" and as_yaml[0]["labels"] == node["labels"] and as_yaml[0]["kid"] == node["kid"]

    table = cli("nodes", "list", *data(hub)).stdout  # piped: plain columns, nothing cut or wrapped
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["ID", "LIVENESS", "HEALTH", "ENROLLMENT"] and "LAST SEEN" in lines[0]
    assert len(lines) == 2 and f"note={LONG}" in lines[1] and lines[1].startswith("n1 ")
    assert not any(c in table for c in "…│┃━─"), table
    wide = cli("nodes", "list", "-o", "wide", *data(hub)).stdout.splitlines()
    assert {"SLOTS", "BREAKER", "CAPS"} <= set(wide[0].split()) and " ago" in wide[1]

    shown = cli("nodes", "show", "n1", *data(hub)).stdout
    for expected in ("node n1", "liveness:", "online since", "last seen:", " ago)", "kid:", LONG, "capabilities:"):
        assert expected in shown, (expected, shown)
    assert yaml.safe_load(cli("nodes", "show", "n1", "-o", "yaml", *data(hub)).stdout)["id"] == "n1"

    runs = cli("run", "list", *data(hub)).stdout.splitlines()
    assert runs[0].split()[:5] == ["ID", "WORKFLOW", "VERSION", "STATE", "AGE"]
    mine = next(line for line in runs if line.startswith(run_id))
    assert "two" in mine and "succeeded" in mine and " s" in mine
    assert "SUBMITTED" in cli("run", "list", "-o", "wide", *data(hub)).stdout.splitlines()[0]
    listed = yaml.safe_load(cli("run", "list", "-o", "yaml", *data(hub)).stdout)
    assert any(r["id"] == run_id and r["submitted_at"] > 10**12 for r in listed)  # raw epoch ms

    text = cli("run", "show", run_id, *data(hub)).stdout
    for expected in (f"run {run_id}  two 1.0.0  succeeded", "submitted:", " ago)", "took", "steps:",
                     "a  succeeded  on n1  attempt", "b  succeeded  on n1", 'output: {"v": 2}'):
        assert expected in text, (expected, text)
    run = yaml.safe_load(cli("run", "show", run_id, "-o", "yaml", *data(hub)).stdout)
    assert run["steps"][1]["output"] == {"v": 2} and run["steps"][1]["waiting"] is None
    assert "[assigned " in cli("run", "show", run_id, "-o", "wide", *data(hub)).stdout
    conflict = cli("run", "show", run_id, "--json", "-o", "yaml", *data(hub))
    assert conflict.returncode == 2 and "disagree" in conflict.stderr


class Lines:
    """Reads a process's stdout on a thread, so every wait on it has a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.text = ""
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.queue.put(line)

    def until(self, predicate: Any, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; got:\n{self.text}")
            try:
                self.text += self.queue.get(timeout=min(left, 0.5))
            except queue.Empty:
                pass
        return self.text


def test_watch_redraws_on_change_and_ctrl_c_ends_it_with_exit_0(hub: HubProcess, tmp_path: Path) -> None:
    proc = subprocess.Popen([FLEETFLOW, "run", "list", "-w", *data(hub)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc)
        lines.until(lambda t: "ID" in t, 20, "the first listing")
        run_id = hub.submit(TWO)
        text = lines.until(lambda t: any(line.startswith(run_id) and " succeeded " in line for line in t.splitlines()),
                           20, "a listing with the new run succeeded")
        assert sum(1 for line in text.splitlines() if line.startswith("ID ")) >= 2  # printed again as it changed
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        # A generous bound: on a saturated machine the interpreter's exit alone was seen to take seconds.
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
        assert code == 0, stderr
        assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    # `run show -w` ends by itself once the run has ended; a JSON watch prints one document per change
    # (a step of 2 s: on a busy machine a quick run could end before the watch prints its first document)
    shown = cli("run", "show", hub.submit(NAP), "-w", "-o", "json", "--watch-timeout", "30", *data(hub))
    documents = [json.loads(line) for line in shown.stdout.splitlines()]
    assert shown.returncode == 0 and documents[-1]["state"] == "succeeded" and len(documents) >= 2
    # a watch bounded by --watch-timeout ends with exit 0; heartbeats alone do not make it print again
    nodes = cli("nodes", "list", "-w", "--watch-timeout", "2", *data(hub))
    assert nodes.returncode == 0 and nodes.stdout.count("LIVENESS") == 1, nodes.stdout


def test_submit_wait_reports_progress_on_stderr_and_one_line_on_stdout(hub: HubProcess, tmp_path: Path) -> None:
    out = cli("run", "submit", workflow(tmp_path, TWO), "--wait", *data(hub))
    assert out.returncode == 0, out.stderr
    run_id, state = out.stdout.split()
    assert out.stdout == f"{run_id} succeeded\n"
    progress = out.stderr.splitlines()
    assert f"{run_id}: step a: running on n1 (attempt" in out.stderr, out.stderr
    assert any(line.startswith(f"{run_id}: step a: succeeded on n1") for line in progress), progress
    assert any(line.startswith(f"{run_id}: step b: succeeded on n1") for line in progress), progress
    assert progress.index(next(x for x in progress if "step a: succeeded" in x)) < progress.index(
        next(x for x in progress if "step b: succeeded" in x))
    as_json = cli("run", "submit", workflow(tmp_path, TWO), "--wait", "-o", "json", *data(hub))
    assert json.loads(as_json.stdout)["state"] == "succeeded" and "step b: succeeded" in as_json.stderr


def test_submit_refuses_what_validate_rejects_unless_forced(hub: HubProcess, tmp_path: Path) -> None:
    path = workflow(tmp_path, TOO_SHORT)
    before = len(hub.get("/runs"))
    out = cli("run", "submit", path, *data(hub))
    assert out.returncode == 1 and out.stdout == ""
    assert "timeout 100 s is shorter than the longest path" in out.stderr and "--force" in out.stderr
    assert len(hub.get("/runs")) == before  # nothing was sent
    forced = cli("run", "submit", path, "--force", "--wait", *data(hub))
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.endswith(" succeeded\n") and "submitting anyway (--force)" in forced.stderr


def test_hub_and_agent_log_the_moments_that_matter(tmp_path: Path, mosquitto: Broker) -> None:
    with HubProcess(mosquitto, "logs", tmp_path / "hub") as hub:
        agent = hub.agent("n1", *calm(tmp_path))
        hub.wait_nodes(1)
        run_id = hub.submit(TWO)
        assert hub.wait_run(run_id)["state"] == "succeeded"
        hub.wait(lambda: f"run {run_id} (two 1.0.0) succeeded in " in hub.log(), 10, "the run finished line")
        # a node that stops answering fails; its heartbeats coming back make it online again, with no reconnect
        agent.signal(signal.SIGSTOP)
        try:
            hub.wait(lambda: "node n1 failed: no heartbeat for" in hub.log(), 20, "the node failed line")
        finally:
            agent.signal(signal.SIGCONT)
        hub.wait(lambda: "node n1 recovered: online again (it was failed" in hub.log(), 20, "the recovered line")
        log = hub.log()
        assert "node n1 joined: profile container" in log and "node n1 suspected: nothing heard for" in log
        assert "node n1 enrolled by auto-accept" in log
        agent_log = agent.log()
        assert f"step a of run {run_id} started (attempt" in agent_log
        assert f"step b of run {run_id} succeeded in " in agent_log


def test_help_renders_flags_as_flags_and_completion_works() -> None:
    for args in (["--help"], ["run", "list", "--help"], ["nodes", "drain", "--help"], ["run", "submit", "--help"]):
        out = cli(*args)
        assert out.returncode == 0 and "<bool>" not in out.stdout, out.stdout
    assert "--version" in cli("--help").stdout and "--show-completion" in cli("--help").stdout
    # the script as a bash user gets it (the shell is detected from the parent process)
    script = subprocess.run(["bash", "-c", f"{FLEETFLOW} --show-completion; exit $?"], capture_output=True, text=True,
                            timeout=60)
    assert script.returncode == 0 and "_FLEETFLOW_COMPLETE=complete_bash" in script.stdout, script.stderr
    # and what the script asks `fleetflow` for: commands, subcommands, option values
    env = {**os.environ, "_FLEETFLOW_COMPLETE": "complete_bash"}
    for words, cword, expected in (("fleetflow ru", "1", {"run"}), ("fleetflow run s", "2", {"submit", "show"}),
                                   ("fleetflow nodes list -o ", "4", {"table", "wide", "json", "yaml"})):
        done = subprocess.run([FLEETFLOW], env={**env, "COMP_WORDS": words, "COMP_CWORD": cword},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and expected <= set(done.stdout.split()), (words, done.stdout, done.stderr)
