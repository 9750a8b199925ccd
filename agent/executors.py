"""Step executors. Builtins (`noop`, `sleep`, `echo`, `fail`) are always on; `shell` and `python` can run arbitrary
code, so they are off until the agent's config enables them, each with an allowlist. So are the update executors
(`artifact.install`, `artifact.rollback` in artifacts.py; `service.restart`, `health.check` in services.py), which
change what the device runs.

An executor is an async callable `(inputs, context) -> output map`; it raises `StepFailed` for a failure the hub
should see as the step's error. Cancellation (a hub `cancel`, a newer fence, the step timeout, shutdown) arrives as
`asyncio.CancelledError`; the shell executor then kills the step's whole process group.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import inspect
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocols import FleetflowError

from .runtime.timeouts import within

if TYPE_CHECKING:
    import nacl.signing

    from .artifacts import ArtifactSettings
    from .config import AgentConfig
    from .services import ServiceSettings

Output = dict[str, Any]


class StepFailed(FleetflowError):
    """The step ran and failed; the message is reported to the hub as the step's error."""


@dataclass
class StepContext:
    run: str
    step: str
    attempt: str
    fence: int
    timeout: float
    # Called with the process group id of a shell step (recorded in the outbox so a restart can kill leftovers).
    on_process_group: Callable[[int | None], None] = lambda pgid: None
    speed: float = 1.0  # simulated devices run sleeps slower or faster


Executor = Callable[[dict[str, Any], StepContext], Awaitable[Output]]


@dataclass
class ExecutorPolicy:
    """What the agent's config allows beyond the builtins."""

    shell: bool = False
    shell_allow: tuple[str, ...] = ()      # allowed argv[0] values (exact paths or glob patterns)
    python: bool = False
    python_allow: tuple[str, ...] = ()     # allowed "module:function" targets (glob patterns)
    output_limit: int = 64 * 1024          # bytes of stdout/stderr kept per stream
    kill_grace: float = 2.0                # SIGTERM -> SIGKILL delay for a process group
    extra: dict[str, Executor] = field(default_factory=dict)  # e.g. simulated hardware steps
    artifacts: ArtifactSettings | None = None  # artifact.install and artifact.rollback; None: off
    services: ServiceSettings | None = None    # service.restart; None: off
    health_allow: tuple[str, ...] | None = None  # health.check, probing only these URLs and commands; None: off


async def run_noop(inputs: dict[str, Any], ctx: StepContext) -> Output:
    return {}


async def run_sleep(inputs: dict[str, Any], ctx: StepContext) -> Output:
    seconds = inputs.get("seconds", 1)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise StepFailed(f"sleep: 'seconds' must be a number >= 0, got {seconds!r}")
    await asyncio.sleep(seconds * ctx.speed)
    return {"slept": seconds}


async def run_echo(inputs: dict[str, Any], ctx: StepContext) -> Output:
    return dict(inputs)


async def run_fail(inputs: dict[str, Any], ctx: StepContext) -> Output:
    raise StepFailed(str(inputs.get("message", "failed on purpose")))


BUILTINS: dict[str, Executor] = {"noop": run_noop, "sleep": run_sleep, "echo": run_echo, "fail": run_fail}


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def stop_process_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM to the process group a child leads (started with start_new_session), SIGKILL after `grace` s."""
    kill_group(proc.pid, signal.SIGTERM)
    try:
        await within(grace, proc.wait())
    except (asyncio.TimeoutError, asyncio.CancelledError):
        pass
    kill_group(proc.pid, signal.SIGKILL)


def allowed(value: str, patterns: tuple[str, ...]) -> bool:
    """`value` is one of `patterns`, exactly or as a glob pattern (an allowlist entry)."""
    return any(value == pattern or fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def kill_process_group(pgid: int) -> None:
    """Used after a crash: whatever is left of an interrupted shell step goes."""
    kill_group(pgid, signal.SIGKILL)


def make_shell(policy: ExecutorPolicy) -> Executor:
    async def run_shell(inputs: dict[str, Any], ctx: StepContext) -> Output:
        argv = inputs.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise StepFailed("shell: 'argv' must be a non-empty list of strings (no shell string is run)")
        if not allowed(argv[0], policy.shell_allow):
            raise StepFailed(f"shell: {argv[0]!r} is not on this agent's shell allowlist")
        env = inputs.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise StepFailed("shell: 'env' must be a map of strings")
        cwd = inputs.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise StepFailed("shell: 'cwd' must be a string")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=cwd, env={**os.environ, **env} if env else None,
                start_new_session=True)  # its own process group, so timeout/cancel kills the whole tree
        except OSError as exc:
            raise StepFailed(f"shell: cannot start {argv[0]!r}: {exc.strerror}") from None
        pgid = proc.pid
        ctx.on_process_group(pgid)
        limit = policy.output_limit

        async def read(stream: asyncio.StreamReader) -> tuple[bytes, int]:
            kept, total = bytearray(), 0
            while chunk := await stream.read(65536):
                total += len(chunk)
                if len(kept) < limit:
                    kept += chunk[: limit - len(kept)]
            return bytes(kept), total

        readers = asyncio.gather(read(proc.stdout), read(proc.stderr))  # type: ignore[arg-type]
        try:
            (out, out_total), (err, err_total) = await readers
            code = await proc.wait()
        except asyncio.CancelledError:
            await stop_process_group(proc, policy.kill_grace)
            readers.cancel()
            raise
        finally:
            # Children that outlive a finished step (daemonised or backgrounded) go too.
            kill_group(pgid, signal.SIGKILL)
            ctx.on_process_group(None)
        stderr = err.decode(errors="replace")
        result = {"exit_code": code, "stdout": out.decode(errors="replace"), "stderr": stderr,
                  "stdout_truncated": out_total > limit, "stderr_truncated": err_total > limit}
        if code != 0:
            tail = stderr.strip().splitlines()[-1:] or [""]
            raise StepFailed(f"shell: {argv[0]} exited with {code}" + (f": {tail[0][:200]}" if tail[0] else ""))
        return result

    return run_shell


def _resolve_python(target: str, policy: ExecutorPolicy) -> Callable[..., Any]:
    if ":" in target:
        if not any(fnmatch.fnmatchcase(target, allowed) for allowed in policy.python_allow):
            raise StepFailed(f"python: {target!r} is not on this agent's python allowlist")
        module_name, _, attr = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise StepFailed(f"python: cannot load {target!r}: {exc}") from None
        return obj
    # An entry point name: installed packages declare these in the `fleetflow.steps` group. importlib.metadata is
    # imported here, not at the top: it weighs 0.8 MB resident in an agent that may never run a python step.
    from importlib import metadata  # `import importlib.metadata` here would make `importlib` local to the function

    for ep in metadata.entry_points(group="fleetflow.steps"):
        if ep.name == target:
            return ep.load()
    raise StepFailed(f"python: no entry point {target!r} in group fleetflow.steps")


def make_python(policy: ExecutorPolicy) -> Executor:
    async def run_python(inputs: dict[str, Any], ctx: StepContext) -> Output:
        target = inputs.get("function")
        if not isinstance(target, str) or not target:
            raise StepFailed("python: 'function' must name module:function or an entry point")
        fn = _resolve_python(target, policy)
        args = inputs.get("args", {})
        if not isinstance(args, dict):
            raise StepFailed("python: 'args' must be a map")
        try:
            if inspect.iscoroutinefunction(fn):
                value = await fn(**args)
            else:
                # A thread cannot be killed: a cancelled sync function finishes in the background, its result unused.
                value = await asyncio.to_thread(fn, **args)
        except StepFailed:
            raise
        except Exception as exc:
            raise StepFailed(f"python: {target} raised {type(exc).__name__}: {exc}") from None
        if value is None:
            return {}
        return value if isinstance(value, dict) else {"value": value}

    return run_python


def update_executors(config: AgentConfig, node_key: nacl.signing.SigningKey,
                     hub_keys: Callable[[], tuple[bytes, ...]]) -> dict[str, Any]:
    """The `ExecutorPolicy` fields of the update executors, from the agent's config (each None when it is off)."""
    from .artifacts import ArtifactSettings
    from .services import ServiceSettings

    root = config.artifacts_dir or config.data / "artifacts"
    return {
        "artifacts": ArtifactSettings(root, config.fleet, config.node_id, node_key, hub_keys, config.artifacts_hub_url,
                                      config.artifacts_ca_file, config.artifacts_max_bytes)
        if config.artifacts else None,
        "services": ServiceSettings(root, config.data / "services", config.service_units, config.service_supervise)
        if config.service else None,
        "health_allow": config.health_allow if config.health else None,
    }


def build_executors(policy: ExecutorPolicy) -> tuple[dict[str, Executor], set[str]]:
    """(enabled executors, names known but disabled)."""
    enabled = dict(BUILTINS)
    enabled.update(policy.extra)
    disabled = set()
    if policy.shell:
        enabled["shell"] = make_shell(policy)
    else:
        disabled.add("shell")
    if policy.python:
        enabled["python"] = make_python(policy)
    else:
        disabled.add("python")
    # Imported here: those modules build on this one (StepFailed, allowlists, process groups).
    from .artifacts import INSTALL, ROLLBACK, make_artifact_executors
    from .services import HEALTH, RESTART, make_health_check, make_service_restart

    if policy.artifacts is not None:
        enabled.update(make_artifact_executors(policy.artifacts))
    else:
        disabled.update((INSTALL, ROLLBACK))
    if policy.services is not None:
        enabled[RESTART] = make_service_restart(policy.services)
    else:
        disabled.add(RESTART)
    if policy.health_allow is not None:
        enabled[HEALTH] = make_health_check(policy.health_allow, policy.kill_grace)
    else:
        disabled.add(HEALTH)
    return enabled, disabled
