"""Step executors. Builtins (`noop`, `sleep`, `echo`, `fail`) are always on; `shell` and `python` can run arbitrary
code, so they are off until the agent's config enables them, each with an allowlist.

An executor is an async callable `(inputs, context) -> output map`; it raises `StepFailed` for a failure the hub
should see as the step's error. Cancellation (a hub `cancel`, a newer fence, the step timeout, shutdown) arrives as
`asyncio.CancelledError`; the shell executor then kills the step's whole process group.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import importlib.metadata
import inspect
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from protocols import FleetflowError

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


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_process_group(pgid: int) -> None:
    """Used after a crash: whatever is left of an interrupted shell step goes."""
    _kill_group(pgid, signal.SIGKILL)


def make_shell(policy: ExecutorPolicy) -> Executor:
    async def run_shell(inputs: dict[str, Any], ctx: StepContext) -> Output:
        argv = inputs.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise StepFailed("shell: 'argv' must be a non-empty list of strings (no shell string is run)")
        if not any(argv[0] == allowed or fnmatch.fnmatchcase(argv[0], allowed) for allowed in policy.shell_allow):
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
            _kill_group(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), policy.kill_grace)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            _kill_group(pgid, signal.SIGKILL)
            readers.cancel()
            raise
        finally:
            # Children that outlive a finished step (daemonised or backgrounded) go too.
            _kill_group(pgid, signal.SIGKILL)
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
    # An entry point name: installed packages declare these in the `fleetflow.steps` group.
    for ep in importlib.metadata.entry_points(group="fleetflow.steps"):
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
    return enabled, disabled
