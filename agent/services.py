"""`service.restart` and `health.check`: what an update does after `artifact.install`. Both are off until the agent's
config enables them, and both act only on what the config lists.

service.restart `{service: NAME}`: a systemd unit (`systemctl restart NAME`) when systemd runs on the node and NAME
matches `service_units`; otherwise a process this agent supervises, declared in `service_supervise` as
`NAME = COMMAND`: it runs COMMAND in `<artifacts dir>/NAME/current` (the installed version, resolved at each
start), in a process group of its own, its output appended to `DATA/services/NAME.log`. A restart stops the running
one (SIGTERM, then SIGKILL after a grace period) and starts it again; one that exits on its own is started again
with a growing pause. The pid file (`DATA/services/NAME.pid`, with the process's start time, so a reused pid is
never killed) lets a restarted agent stop the process an earlier agent started. Processes outlive the agent: an
agent upgrade does not stop the service it updates.

health.check `{http: URL}` or `{argv: [...]}`: probes until one passes, a bounded number of times within a bounded
time; URL and argv[0] must match `health_allow`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from .config import parse_supervised
from .executors import Executor, Output, StepContext, StepFailed, allowed, kill_group, stop_process_group
from .runtime.storage import write_private
from .runtime.timeouts import within

log = logging.getLogger("fleetflow.agent")

RESTART: Final = "service.restart"
HEALTH: Final = "health.check"
LOG_ROTATE_BYTES: Final = 10 << 20


@dataclass(frozen=True)
class ServiceSettings:
    artifacts_root: Path            # supervised services run in <artifacts_root>/<name>/current
    state_dir: Path                 # their pid files and logs
    units: tuple[str, ...] = ()     # systemd units that may be restarted (glob patterns)
    supervise: tuple[str, ...] = ()  # "NAME = COMMAND" entries (agent/config.py checked them)
    systemd_marker: Path = Path("/run/systemd/system")  # exists when systemd is the init system (sd_booted(3))
    kill_grace: float = 5.0
    restart_pause: tuple[float, float] = (1.0, 60.0)  # first and longest pause before restarting a crashed process

    def supervised(self) -> dict[str, list[str]]:
        return dict(parse_supervised(entry) for entry in self.supervise)

    def systemd(self) -> bool:
        return self.systemd_marker.is_dir() and shutil.which("systemctl") is not None


def _number(inputs: dict[str, Any], name: str, default: float, low: float, high: float, executor: str) -> float:
    value = inputs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise StepFailed(f"{executor}: with.{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


async def _run(argv: list[str], timeout: float, grace: float) -> tuple[int | None, str]:
    """Run a command in its own process group; (exit code, or None when it timed out and was killed; output tail)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True)
    try:
        out, _ = await within(timeout, proc.communicate())
    except asyncio.TimeoutError:
        await stop_process_group(proc, grace)
        return None, ""
    except asyncio.CancelledError:
        await stop_process_group(proc, grace)
        raise
    finally:
        kill_group(proc.pid, signal.SIGKILL)  # what it left running in the background goes too
    lines = out.decode(errors="replace").strip().splitlines()
    return proc.returncode, (lines[-1][:200] if lines else "")


# -- supervised processes ------------------------------------------------------------------------------------------

@dataclass
class _Running:
    proc: asyncio.subprocess.Process
    version: str
    started: float
    watcher: asyncio.Task[None] | None = None


@dataclass
class Supervisor:
    """The processes of `service_supervise` this agent started, kept running until restarted."""

    settings: ServiceSettings
    running: dict[str, _Running] = field(default_factory=dict)

    def _pidfile(self, name: str) -> Path:
        return self.settings.state_dir / f"{name}.pid"

    async def restart(self, name: str, argv: list[str], settle: float) -> Output:
        previous = await self._stop(name)
        entry = await self._start(name, argv)
        try:
            code = await within(settle, asyncio.shield(entry.proc.wait()))
        except asyncio.TimeoutError:
            code = None
        if code is not None:
            self.running.pop(name, None)
            raise StepFailed(f"{RESTART}: {name} exited with {code} within {settle:g} s of its start: "
                             f"{self._log_tail(name) or 'no output'} (log: {self.settings.state_dir / name}.log)")
        entry.watcher = asyncio.get_running_loop().create_task(self._watch(name, argv, entry),
                                                               name=f"supervise {name}")
        return {"service": name, "manager": "supervisor", "pid": entry.proc.pid, "previous_pid": previous,
                "version": entry.version}

    async def _stop(self, name: str) -> int | None:
        entry = self.running.pop(name, None)
        if entry is not None:
            if entry.watcher is not None:
                entry.watcher.cancel()  # a deliberate stop: not a crash to restart
            await stop_process_group(entry.proc, self.settings.kill_grace)
            return entry.proc.pid
        return await asyncio.to_thread(self._stop_adopted, name)

    def _stop_adopted(self, name: str) -> int | None:
        """The process an earlier agent started, when the pid file still names it (pid and start time)."""
        try:
            recorded = json.loads(self._pidfile(name).read_text())
            process = psutil.Process(int(recorded["pid"]))
            if abs(process.create_time() - float(recorded["started"])) > 0.01:
                return None  # the pid was reused by something else
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None
        kill_group(process.pid, signal.SIGTERM)
        try:
            process.wait(self.settings.kill_grace)
        except psutil.TimeoutExpired:
            kill_group(process.pid, signal.SIGKILL)
        except psutil.Error:
            pass
        return process.pid

    async def _start(self, name: str, argv: list[str]) -> _Running:
        current = self.settings.artifacts_root / name / "current"
        if not current.is_dir():
            raise StepFailed(f"{RESTART}: no version of {name} is installed ({current} is missing): install the "
                             f"artifact {name} first")
        cwd = current.resolve()  # the version now: a later switch does not move a running process
        program = argv[0] if "/" not in argv[0] else str((cwd / argv[0]).resolve())
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.settings.state_dir / f"{name}.log"
        if logfile.exists() and logfile.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(logfile, logfile.with_suffix(".log.1"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETFLOW_")}  # the agent's secrets stay
        env.update(FLEETFLOW_SERVICE=name, FLEETFLOW_VERSION=cwd.name)
        with open(logfile, "ab") as out:
            try:
                proc = await asyncio.create_subprocess_exec(program, *argv[1:], cwd=cwd, env=env,
                                                            stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise StepFailed(f"{RESTART}: cannot start {name} ({argv[0]!r}): {exc.strerror}") from None
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:  # gone at once: the settle wait reports it
            started = 0.0
        # Replaced atomically: a reader (the next agent, an operator's script) never sees half of it.
        write_private(self._pidfile(name), json.dumps({"pid": proc.pid, "started": started, "version": cwd.name})
                      .encode())
        entry = self.running[name] = _Running(proc, cwd.name, time.monotonic())
        log.info("service %s started (pid %d, version %s)", name, proc.pid, cwd.name)
        return entry

    async def _watch(self, name: str, argv: list[str], entry: _Running) -> None:
        """Start the service again whenever it exits on its own, pausing longer after each quick exit."""
        pause = self.settings.restart_pause[0]
        while True:
            code = await entry.proc.wait()
            if self.running.get(name) is not entry:
                return
            lived = time.monotonic() - entry.started
            pause = self.settings.restart_pause[0] if lived > self.settings.restart_pause[1] else pause
            log.warning("service %s (pid %d) exited with %s after %.1f s; starting it again in %.1f s", name,
                        entry.proc.pid, code, lived, pause)
            await asyncio.sleep(pause)
            pause = min(self.settings.restart_pause[1], pause * 2)
            try:
                new = await self._start(name, argv)
            except StepFailed as exc:
                log.error("service %s: %s", name, exc)
                self.running.pop(name, None)
                return
            new.watcher, entry = asyncio.current_task(), new

    def _log_tail(self, name: str) -> str:
        try:
            lines = (self.settings.state_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""


def make_service_restart(settings: ServiceSettings) -> Executor:
    supervisor = Supervisor(settings)
    supervised = settings.supervised()

    async def restart(inputs: dict[str, Any], ctx: StepContext) -> Output:
        name = inputs.get("service")
        if not isinstance(name, str) or not name:
            raise StepFailed(f"{RESTART}: with.service must name a systemd unit or a supervised service")
        settle = _number(inputs, "settle", 1.0, 0.0, 600.0, RESTART)
        if allowed(name, settings.units) and settings.systemd():
            timeout = _number(inputs, "timeout", 90.0, 1.0, 3600.0, RESTART)
            code, tail = await _run(["systemctl", "restart", "--", name], timeout, settings.kill_grace)
            if code != 0:
                why = f"timed out after {timeout:g} s" if code is None else f"exited with {code}"
                raise StepFailed(f"{RESTART}: systemctl restart {name} {why}" + (f": {tail}" if tail else ""))
            return {"service": name, "manager": "systemd"}
        if name in supervised:
            return await supervisor.restart(name, supervised[name], settle)
        where = " (systemd is not running here)" if allowed(name, settings.units) else ""
        raise StepFailed(f"{RESTART}: {name!r} is not a service this agent may restart{where}: service_supervise "
                         f"lists {', '.join(sorted(supervised)) or 'none'}, service_units "
                         f"{', '.join(settings.units) or 'none'}")

    return restart


# -- health checks -------------------------------------------------------------------------------------------------

def _http_probe(url: str, timeout: float, expect: int | None, contains: str | None) -> str | None:
    """None when healthy, else what was wrong. Blocking."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read(64 * 1024)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, b""
        exc.close()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))
    if (status != expect) if expect is not None else not 200 <= status < 300:
        return f"HTTP {status}"
    if contains is not None and contains.encode() not in body:
        return f"HTTP {status} without {contains[:60]!r} in the body"
    return None


def make_health_check(allow: tuple[str, ...], kill_grace: float = 2.0) -> Executor:
    async def check(inputs: dict[str, Any], ctx: StepContext) -> Output:
        url, argv = inputs.get("http"), inputs.get("argv")
        if (url is None) == (argv is None):
            raise StepFailed(f"{HEALTH}: give with.http (a URL) or with.argv (a command), one of them")
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            raise StepFailed(f"{HEALTH}: with.http must be an http:// or https:// URL")
        if argv is not None and (not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)):
            raise StepFailed(f"{HEALTH}: with.argv must be a non-empty list of strings")
        command: list[str] = argv or []
        target = url if url is not None else command[0]
        if not allowed(target, allow):
            raise StepFailed(f"{HEALTH}: {target!r} is not on this agent's health_allow list")
        attempts = int(_number(inputs, "attempts", 10, 1, 1000, HEALTH))
        interval = _number(inputs, "interval", 1.0, 0.0, 3600.0, HEALTH)
        timeout = _number(inputs, "timeout", 5.0, 0.1, 3600.0, HEALTH)
        within = _number(inputs, "within", 60.0, 0.1, 86400.0, HEALTH)
        expect = inputs.get("expect_status")
        contains = inputs.get("contains")
        if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int)):
            raise StepFailed(f"{HEALTH}: with.expect_status must be an HTTP status code")
        if contains is not None and not isinstance(contains, str):
            raise StepFailed(f"{HEALTH}: with.contains must be text")
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + within
        problem = ""
        for number in range(1, attempts + 1):
            budget = min(timeout, max(0.1, deadline - loop.time()))
            if url is not None:
                refused: str | None = await asyncio.to_thread(_http_probe, url, budget, expect, contains)
                problem = refused or ""
            else:
                code, tail = await _run(command, budget, kill_grace)
                problem = "" if code == 0 else (f"timed out after {budget:g} s" if code is None
                                                 else f"exited with {code}" + (f": {tail}" if tail else ""))
            if not problem:
                return {"healthy": True, "attempts": number, "elapsed": round(loop.time() - start, 3)}
            if number == attempts or loop.time() + interval >= deadline:
                break
            await asyncio.sleep(interval)
        raise StepFailed(f"{HEALTH}: {target} not healthy after {number} attempt(s) in "
                         f"{loop.time() - start:.1f} s: {problem}")

    return check
