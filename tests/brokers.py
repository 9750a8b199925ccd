"""Real MQTT brokers for tests: Mosquitto and amqtt, each on a free port on 127.0.0.1 with a generated config.

Never a fixed port, never a broker someone else started. Every wait is bounded.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
KINDS = ("mosquitto", "amqtt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout} s")


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> Tls:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fleetflow-test-ca",
        "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(cert))
    return Tls(ca, cert, key)


@dataclass
class Broker:
    kind: str
    workdir: Path
    port: int = field(default_factory=free_port)
    tls: Tls | None = None
    username: str | None = None
    password: str | None = None
    extra: tuple[str, ...] = ()  # more mosquitto.conf lines
    proc: subprocess.Popen | None = None
    # Mosquitto only: run this mosquitto.conf (e.g. one `fleetflow broker config` wrote, listening on `port`) plus
    # `extra`, instead of a generated one; `tls` then only makes the URL mqtts://, and `username` is unused.
    config: Path | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{HOST}:{self.port}"

    def _command(self) -> list[str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "mosquitto" and self.config is not None:
            conf = self.workdir / "mosquitto.conf"
            conf.write_text("\n".join([*self.config.read_text().splitlines(), f"user {getpass.getuser()}",
                                       *self.extra]) + "\n")
            return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            # Started as root, Mosquitto drops to its own user and could not read our 0600 files.
            lines = [f"user {getpass.getuser()}", f"listener {self.port} {HOST}", "persistence false", "log_dest stderr", "log_type error",
                     "log_type warning", "set_tcp_nodelay true", "max_keepalive 3600"]
            if self.username is not None:
                pw = self.workdir / "passwd"
                pw.write_text("")
                subprocess.run(["mosquitto_passwd", "-b", str(pw), self.username, self.password or ""], check=True,
                               capture_output=True, timeout=30)
                os.chmod(pw, 0o600)
                lines += ["allow_anonymous false", f"password_file {pw}"]
            else:
                lines.append("allow_anonymous true")
            if self.tls is not None:
                lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
            lines += self.extra
            conf.write_text("\n".join(lines) + "\n")
            return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
        if self.kind == "amqtt":
            conf = self.workdir / "amqtt.yaml"
            conf.write_text(
                "listeners:\n  default:\n    type: tcp\n"
                f"    bind: {HOST}:{self.port}\n"
                "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
            return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
        raise ValueError(f"unknown broker kind {self.kind!r}")

    def start(self) -> Broker:
        """Start (or restart, on the same port) and wait until it listens."""
        command = self._command()
        with open(self.workdir / f"{self.kind}.log", "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        path = self.workdir / f"{self.kind}.log"
        return path.read_text(errors="replace") if path.exists() else ""
