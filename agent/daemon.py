"""The agent process itself: `fleetflow agent run` parses settings, then execs `python -m agent.daemon FD LEVEL`.

The exec keeps typer, click and rich (about 11 MB) out of a process that runs for months on small devices. Settings
arrive as JSON through an inherited pipe, so a broker password never appears in argv or the environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .config import AgentConfig, ConfigError


def config_to_json(config: AgentConfig) -> str:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return json.dumps(out)


def config_from_json(text: str) -> AgentConfig:
    raw = json.loads(text)
    for name in ("data", "profiles_dir", "artifacts_dir"):
        if raw.get(name) is not None:
            raw[name] = Path(raw[name])
    if raw.get("hub_key"):
        raw["hub_key"] = bytes.fromhex(raw["hub_key"])
    for name in ("shell_allow", "python_allow", "service_units", "service_supervise", "health_allow"):
        raw[name] = tuple(raw.get(name) or ())
    return AgentConfig(**raw)


def exec_daemon(config: AgentConfig, log_level: str) -> None:
    """Replace this process (same PID, so systemd and signals still see it) with the lean agent process."""
    read_end, write_end = os.pipe()
    os.write(write_end, config_to_json(config).encode())
    os.close(write_end)
    os.set_inheritable(read_end, True)
    sys.stdout.flush()
    sys.stderr.flush()
    # The last argument only names the node for `ps` and operators; settings come through the pipe.
    os.execv(sys.executable, [sys.executable, "-m", "agent.daemon", str(read_end), log_level,
                              f"node={config.fleet}/{config.node_id}"])


EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error


def run_agent(settings: AgentConfig) -> int:
    """Exit codes: 0 stopped by a signal; 2 a setting or file is wrong (config, key, identity, profile); 1 the
    start failed otherwise (data directory in use or not writable, broker unreachable at the first connection);
    70 an internal error stopped it (crash-only: restart it)."""
    from .identity import IdentityError
    from .runtime.keys import KeyFileError
    from .node import Agent
    from .runtime.profiles import ProfileError
    from .runtime.startup import DataLock, StartupError

    try:
        # First of all: a second agent on this directory must be refused before it changes anything in it.
        lock = DataLock.acquire(settings.data)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    async def main() -> int:
        try:
            agent = Agent(settings)
        except (IdentityError, KeyFileError, ProfileError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a file in the directory that cannot be written (the directory itself was checked)
            reason = (exc.strerror or str(exc)).lower()
            print(f"error: data directory {settings.data} (--data) is not usable: {reason}"
                  + (f" ({exc.filename})" if exc.filename else ""), file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        try:
            await agent.run(first_connection_required=True)
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:
            # Crash-only: an unexpected error in the session loop stops the agent instead of leaving it half
            # working. Accepted work and results are in the outbox; the service manager restarts the process.
            logging.getLogger("fleetflow.agent").critical(
                "the agent's session loop failed (%s: %s): stopping; restart it, its outbox keeps every result",
                type(exc).__name__, exc, exc_info=True)
            return EXIT_SOFTWARE
        return 0

    try:
        return asyncio.run(main())
    finally:
        lock.release()


def main() -> None:
    if len(sys.argv) not in (3, 4):
        print("usage: python -m agent.daemon SETTINGS_FD LOG_LEVEL [node=FLEET/ID] (started by `fleetflow agent run`)",
              file=sys.stderr)
        sys.exit(2)
    fd = int(sys.argv[1])
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    logging.basicConfig(level=getattr(logging, sys.argv[2].upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_agent(config_from_json(b"".join(chunks).decode())))


if __name__ == "__main__":
    main()
