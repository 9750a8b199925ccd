"""`fleetflow broker config`: a least-privilege Mosquitto setup for one fleet (docs/operations.md, "Least privilege
on the broker").

    OUT/broker/mosquitto.conf          listener, no anonymous clients, the dynamic-security plugin (TLS files)
    OUT/broker/dynamic-security.json   logins and roles (hub/broker_acl.py): hub@F, enroll@F, admin@F (scada@F)
    OUT/broker/server.pem, server.key  with --tls: a certificate signed by a throwaway test CA
    OUT/ca.pem, OUT/ca.key             with --tls: that CA (clients need ca.pem; keep ca.key off the broker)
    OUT/hub.toml                       the hub's settings: broker, fleet, data (OUT/hub), its login, the admin file
    OUT/broker-admin.json              the admin login the hub gives nodes their own logins with
    OUT/agent.toml                     what every device shares: broker, fleet, the enrollment login
    OUT/scada.json                     with --sparkplug-host: the Sparkplug host application's login and topics

With --sparkplug the hub's role also holds its Sparkplug edge node's topics, and hub.toml runs the bridge with the
group and edge node id the ACLs name (flags as `hub run` takes them). Secrets are written mode 0600. As root,
OUT/broker is handed to the `mosquitto` user, which Mosquitto drops to.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import ipaddress
import json
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from agent.runtime.console import fail
from protocols import ProtocolError

from .broker_acl import BrokerLogin, FleetRoles, SparkplugAccess
from .sparkplug.settings import DEFAULT_GROUP, check_sparkplug_id
from agent.runtime.storage import write_private

broker_app = typer.Typer(help="Set up an MQTT broker where each node may publish only as itself.",
                         no_args_is_help=True)

PLUGIN = "mosquitto_dynamic_security.so"
PLUGIN_PLACES = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                 "/usr/local/lib/mosquitto_dynamic_security.so", "/usr/local/lib/*/mosquitto_dynamic_security.so")
# The plugin's own default for the passwords it stores. The passwords made here are 32 random bytes, which no
# number of iterations makes harder to guess; more would only slow every CONNECT.
HASH_ITERATIONS = 101


def hashed(password: str, salt: bytes, iterations: int = HASH_ITERATIONS) -> dict[str, Any]:
    """A password as the dynamic-security plugin stores it: PBKDF2-HMAC-SHA512, base64 hash and salt."""
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def dynsec_state(roles: FleetRoles, logins: list[BrokerLogin]) -> dict[str, Any]:
    """The plugin's initial state: the fixed logins, each with the role of its name; nothing allowed by default."""
    clients = [{"username": login.username, **hashed(login.password, secrets.token_bytes(12)),
                "roles": [{"rolename": login.username}]} for login in logins]
    return {"clients": clients, "groups": [],
            "roles": [{"rolename": name, "acls": acls} for name, acls in roles.roles().items()],
            # Nothing may be published or subscribed to unless a role allows it; what a client did subscribe to,
            # it receives.
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                                 "unsubscribe": True}}


@dataclass(frozen=True)
class Layout:
    out: Path

    @property
    def broker(self) -> Path:
        return self.out / "broker"

    @property
    def conf(self) -> Path:
        return self.broker / "mosquitto.conf"

    @property
    def state(self) -> Path:
        return self.broker / "dynamic-security.json"

    @property
    def hub_toml(self) -> Path:
        return self.out / "hub.toml"

    @property
    def admin_file(self) -> Path:
        return self.out / "broker-admin.json"

    @property
    def agent_toml(self) -> Path:
        return self.out / "agent.toml"

    @property
    def scada_file(self) -> Path:
        return self.out / "scada.json"

    @property
    def ca(self) -> Path:
        return self.out / "ca.pem"

    def files(self) -> tuple[Path, ...]:
        return (self.broker, self.hub_toml, self.admin_file, self.agent_toml, self.scada_file, self.ca,
                self.out / "ca.key")


def mosquitto_conf(layout: Layout, plugin: str, host: str, port: int, tls: bool) -> str:
    # Loopback stays loopback; any other name means clients come from the network: every interface.
    local = host in ("localhost", "::1") or _is_loopback(host)
    lines = ["# fleetflow broker config: every client logs in, the dynamic-security plugin holds the logins and",
             "# ACLs, and the hub adds a login per accepted node (docs/operations.md, Least privilege on the broker).",
             "per_listener_settings false", "allow_anonymous false", f"plugin {plugin}",
             f"plugin_opt_config_file {layout.state}", f"listener {port}{' ' + host if local else ''}",
             "set_tcp_nodelay true"]
    if tls:
        lines += [f"certfile {layout.broker / 'server.pem'}", f"keyfile {layout.broker / 'server.key'}"]
    return "\n".join(lines) + "\n"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _toml(values: dict[str, Any]) -> str:
    # JSON strings are TOML strings, but for \u escapes of surrogate pairs (TOML takes scalar values only): any text
    # outside ASCII (a Sparkplug group may hold any) is written as itself.
    return "".join(f"{key} = {json.dumps(value, ensure_ascii=False)}\n" for key, value in values.items())


def _hub_sparkplug(access: SparkplugAccess | None) -> dict[str, Any]:
    """The `hub run` settings of the bridge the ACLs were written for: a hub with other ids would be refused."""
    if access is None:
        return {}
    return {"sparkplug": True, "sparkplug_group": access.group, "sparkplug_node_id": access.edge_node,
            **({"sparkplug_host": access.host} if access.host is not None else {})}


def make_test_certificates(layout: Layout, host: str) -> None:
    """A throwaway CA and a server certificate for `host` (and localhost), with openssl."""
    if shutil.which("openssl") is None:
        raise OSError("--tls makes test certificates with openssl, which is not installed: install it, or write "
                      "the configuration without --tls and add certfile/keyfile lines for your own certificate")
    name = f"IP:{host}" if _is_ip(host) else f"DNS:{host}"
    ext = layout.broker / "server.ext"
    ext.write_text(f"subjectAltName={name},DNS:localhost,IP:127.0.0.1\n")
    ca_key, csr = layout.out / "ca.key", layout.broker / "server.csr"
    commands = [["req", "-x509", "-newkey", "rsa:3072", "-nodes", "-days", "365", "-subj", "/CN=fleetflow test CA",
                 "-keyout", str(ca_key), "-out", str(layout.ca)],
                ["req", "-newkey", "rsa:3072", "-nodes", "-subj", f"/CN={host}", "-keyout",
                 str(layout.broker / "server.key"), "-out", str(csr)],
                ["x509", "-req", "-in", str(csr), "-CA", str(layout.ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-days", "365", "-extfile", str(ext), "-out", str(layout.broker / "server.pem")]]
    old = os.umask(0o077)  # private keys are never readable by others, not even for a moment
    try:
        for args in commands:
            done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise OSError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")
    finally:
        os.umask(old)
    for leftover in (ext, csr, layout.out / "ca.srl"):
        leftover.unlink(missing_ok=True)
    os.chmod(layout.ca, 0o644)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def find_plugin() -> str | None:
    for pattern in PLUGIN_PLACES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def mosquitto_user(layout: Layout) -> pwd.struct_passwd | None:
    """As root, the user Mosquitto drops to (`mosquitto`), which must read the config and rewrite the plugin's
    state; None when not root (Mosquitto then runs as whoever starts it). Exits 1 if that user cannot work there."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        fail("run as root, but there is no `mosquitto` user for Mosquitto to drop to: run this as the user "
             "Mosquitto runs as", 1)
    for parent in (layout.out, *layout.out.parents):
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            fail(f"Mosquitto, started as root, drops to the mosquitto user, which cannot enter {parent} (mode "
                 f"{stat.S_IMODE(parent.stat().st_mode):o}): choose an --out it can reach (e.g. /etc/fleetflow-broker)",
                 1)
    return user


def _program(name: str, path: str | None) -> str:
    """How a printed command runs the program at `path`: by `name` where the search path finds that very program
    (not a shim or another install), else by its full path."""
    if path is None:
        return name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == Path(path).resolve():
        return name
    return shlex.quote(str(Path(path).resolve()))


def write_config(layout: Layout, roles: FleetRoles, host: str, port: int, tls: bool, plugin: str) -> None:
    fleet, access = roles.fleet, roles.sparkplug
    hub, enroll, admin = (BrokerLogin(name, secrets.token_urlsafe(32))
                          for name in (roles.hub_username, roles.enroll_username, roles.admin_username))
    scada = (BrokerLogin(roles.scada_username, secrets.token_urlsafe(32))
             if access is not None and access.host is not None else None)
    layout.out.mkdir(parents=True, exist_ok=True)
    layout.broker.mkdir(mode=0o700)
    if tls:
        make_test_certificates(layout, host)
    url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
    ca = {"ca_file": str(layout.ca)} if tls else {}
    layout.conf.write_text(mosquitto_conf(layout, plugin, host, port, tls))
    logins = [hub, enroll, admin] + ([scada] if scada is not None else [])
    write_private(layout.state, json.dumps(dynsec_state(roles, logins), indent=1).encode())
    write_private(layout.admin_file, json.dumps({"username": admin.username, "password": admin.password}).encode())
    write_private(layout.hub_toml, _toml({"broker": url, "fleet": fleet, "data": str(layout.out / "hub"), **ca,
                                          "username": hub.username, "password": hub.password,
                                          "broker_admin_file": str(layout.admin_file),
                                          **_hub_sparkplug(access)}).encode())
    if scada is not None and access is not None:
        # What a SCADA or IIoT platform is configured with: its login, and the ids it is a host application for.
        write_private(layout.scada_file, json.dumps({
            "broker": url, **ca, "username": scada.username, "password": scada.password, "host_id": access.host,
            "group": access.group, "edge_node": access.edge_node}, indent=1, ensure_ascii=False).encode())
    write_private(layout.agent_toml, _toml({"broker": url, "fleet": fleet, **ca, "enroll_username": enroll.username,
                                            "enroll_password": enroll.password}).encode())


def sparkplug_access(fleet: str, on: bool, group: str | None, node_id: str | None,
                     host: str | None) -> SparkplugAccess | None:
    """The Sparkplug part of the setup from `broker config`'s flags, each checked as `hub run` checks it; a bad one
    exits 2 naming it."""
    given = {"--sparkplug-group": group, "--sparkplug-node-id": node_id, "--sparkplug-host": host}
    for flag, value in given.items():
        if value is None:
            continue
        if not on:
            fail(f"{flag}: needs --sparkplug", 2)
        try:
            check_sparkplug_id(value)
        except ValueError as exc:
            fail(f"{flag}: {exc}", 2)
    return SparkplugAccess(group or DEFAULT_GROUP, node_id or fleet, host) if on else None


def _scada_login(roles: FleetRoles, layout: Layout) -> str:
    host = roles.sparkplug.host if roles.sparkplug is not None else None
    return "" if host is None else (f", {roles.scada_username} (Sparkplug host application {host}: its login and "
                                    f"ids are in {layout.scada_file})")


def _sparkplug_note(roles: FleetRoles) -> str:
    access = roles.sparkplug
    if access is None:
        return ""
    commands = (f"add --sparkplug-commands to `hub run` to let {roles.scada_username} drain nodes over DCMD"
                if access.host is not None else "no login may send it commands (--sparkplug-host names one)")
    return f"Sparkplug: the hub is edge node {access.edge_node} of group {access.group} (hub.toml); {commands}.\n"


@broker_app.command("config")
def broker_config(out: Path = typer.Option(..., "--out", help="Directory to write into (its files must not exist)"),
                  fleet: str = typer.Option(..., help="Fleet id: the ACLs name its topics"),
                  port: Optional[int] = typer.Option(None, help="Listener port (default: 1883, 8883 with --tls)"),
                  tls: bool = typer.Option(False, "--tls", help="TLS listener, with test certificates from a "
                                                                "throwaway CA (replace them for production)"),
                  host: str = typer.Option("127.0.0.1", help="Name or address clients connect to: in the printed "
                                                             "URLs and the certificate; a loopback address also "
                                                             "limits the listener to it"),
                  plugin: Optional[str] = typer.Option(None, help=f"Path of {PLUGIN} (default: searched in "
                                                                  f"/usr/lib and /usr/local/lib)"),
                  sparkplug: bool = typer.Option(False, "--sparkplug", help="The hub runs its Sparkplug B bridge "
                                                 "(hub run --sparkplug): its edge node's topics in its role, and "
                                                 "in hub.toml"),
                  sparkplug_group: Optional[str] = typer.Option(None, "--sparkplug-group", metavar="G",
                                                                help="Sparkplug group id (default: fleetflow)"),
                  sparkplug_node_id: Optional[str] = typer.Option(None, "--sparkplug-node-id", metavar="ID",
                                                                  help="Sparkplug edge node id (default: the fleet "
                                                                       "id)"),
                  sparkplug_host: Optional[str] = typer.Option(None, "--sparkplug-host", metavar="HOST_ID",
                                                               help="The primary host application: a login "
                                                                    "scada@FLEET (scada.json) that reads the group, "
                                                                    "sends NCMD and DCMD to the hub's edge node and "
                                                                    "publishes STATE/HOST_ID; the hub waits for it")
                  ) -> None:
    """Write a Mosquitto configuration for one fleet in which a node's login may publish only on its own topics,
    only the hub may publish commands and hub state, and a device not enrolled yet may only ask to enroll. The hub
    (with the printed settings) gives each node it accepts a login of its own, and disables it on revoke. With
    --sparkplug the hub may also publish as a Sparkplug edge node, and only the --sparkplug-host login may command
    it."""
    try:
        roles = FleetRoles(fleet, sparkplug_access(fleet, sparkplug, sparkplug_group, sparkplug_node_id,
                                                   sparkplug_host))
    except ProtocolError as exc:
        fail(f"--fleet: {exc}", 2)
    if port is not None and not 0 < port < 65536:
        fail(f"--port: {port} is not a port number", 2)
    port = port or (8883 if tls else 1883)
    plugin = plugin or find_plugin()
    if plugin is None or not Path(plugin).is_file():
        fail(f"cannot find Mosquitto's {PLUGIN} (install mosquitto 2.0 or later, or give --plugin PATH)", 2)
    layout = Layout(out.absolute())
    taken = [str(path) for path in layout.files() if path.exists()]
    if taken:
        fail(f"not overwriting {', '.join(taken)}: the running broker and hub would lose their logins; choose an "
             f"empty --out", 2)
    user = mosquitto_user(layout)
    try:
        write_config(layout, roles, host, port, tls, plugin)
        if user is not None:
            for path in (layout.broker, *layout.broker.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
    except OSError as exc:
        fail(f"cannot write the configuration in {out}: {exc}", 1)
    fleetflow = (_program("fleetflow", sys.argv[0]) if Path(sys.argv[0]).name == "fleetflow"
                 else f"{shlex.quote(sys.executable)} -m agent")
    sbin = Path("/usr/sbin/mosquitto")  # not on an ordinary user's search path
    mosquitto = _program("mosquitto", shutil.which("mosquitto") or (str(sbin) if sbin.exists() else None))
    q = shlex.quote
    typer.echo(
        f"Wrote a least-privilege Mosquitto setup for fleet {fleet} in {out} (secrets mode 0600"
        f"{'; test certificates from a throwaway CA: ' + str(layout.ca) if tls else ''}).\n"
        f"Logins: {roles.hub_username} (the hub), {roles.admin_username} (the hub's login manager), "
        f"{roles.enroll_username} (devices not enrolled yet){_scada_login(roles, layout)}; each accepted node gets "
        f"its own.\n{_sparkplug_note(roles)}\n"
        f"1. The broker{' (it runs as the mosquitto user, owner of ' + str(layout.broker) + ')' if user else ''}:\n"
        f"   {mosquitto} -c {q(str(layout.conf))}\n"
        f"2. The hub (its data in {layout.out / 'hub'}):\n   {fleetflow} hub run --config {q(str(layout.hub_toml))}\n"
        f"3. Each device, with its own node id and data directory (copy {layout.agent_toml.name}"
        f"{' and ca.pem' if tls else ''} to it, mode 0600), once the hub has started:\n"
        f"   {fleetflow} agent run --config {q(str(layout.agent_toml))} --node-id node-1 --data "
        f"{q(str(layout.out / 'node-1'))} --hub-key {q(str(layout.out / 'hub' / 'hub.key.pub'))}\n"
        f"4. Accept the node with the `nodes accept` command the hub logs (with its kid), or let nodes in with "
        f"--auto-accept or an enroll token, as usual.")
