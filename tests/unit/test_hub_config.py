"""The hub as a service: settings from flags > FLEETFLOW_* > a TOML file (one name per setting in all three), errors
that name the setting and its source, secrets never from flags, and install files whose command lines our CLI
accepts."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from hub.config import ConfigError, HubSettings, load_hub_settings
from tests.cli import FLEETFLOW, fleetflow

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "hub" / "install"
REQUIRED = 'broker = "mqtt://127.0.0.1:1"\nfleet = "plant-1"\ndata = "/tmp/fleetflow-hub-test"\n'
TOKEN = "a-long-random-enroll-token-0123456789"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_win_over_environment_over_file(tmp_path: Path) -> None:
    file = write(tmp_path / "hub.toml", REQUIRED + 'api = "0.0.0.0:9000"\nmax_pending = 7\nmax_workflow_steps = 3\n'
                                                  'auto_accept = true\npolicy = "/etc/p.yaml"\nlog_level = "DEBUG"\n'
                                                  'password = "from-file"\n')
    env = {"FLEETFLOW_MAX_PENDING": "8", "FLEETFLOW_MAX_WORKFLOW_STEPS": "4", "FLEETFLOW_PASSWORD": "from-env"}
    settings = load_hub_settings({"max_workflow_steps": 5, "fleet": None}, file, env)
    assert settings.fleet == "plant-1" and settings.api == ("0.0.0.0", 9000) and settings.auto_accept
    assert settings.max_pending == 8  # env over file
    assert settings.limits.steps == 5  # flag over env over file
    assert settings.policy == Path("/etc/p.yaml") and settings.log_level == "debug"
    assert settings.password == "from-env"
    # What is given nowhere keeps the defaults of `hub run`.
    defaults = load_hub_settings({}, write(tmp_path / "min.toml", REQUIRED), {})
    assert defaults.api == ("127.0.0.1", 8470) and defaults.limits == HubSettings("b", "f", Path()).limits
    assert not defaults.auto_accept and defaults.enroll_token is None and defaults.log_level == "info"


def test_every_hub_run_option_is_a_setting_of_the_same_name() -> None:
    from hub.config import PARSERS

    out = fleetflow("hub", "run", "--help", env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    options = set(re.findall(r"--([a-z][a-z-]+)", out.stdout)) - {"help", "config", "enroll-token"}
    assert options, out.stdout
    assert {o.replace("-", "_") for o in options} <= set(PARSERS), options
    assert set(PARSERS) - {o.replace("-", "_") for o in options} == {"password", "enroll_token"}  # secrets: no flag


@pytest.mark.parametrize("flags, env, text, says", [
    ({}, {}, "max_pending = 0\n", "max_pending (from config file {file}:4): must be a positive integer, got 0"),
    ({}, {}, "max_pendng = 3\n", "config file {file}:4: unknown setting 'max_pendng' (did you mean 'max_pending'?)"),
    ({}, {}, 'api = "8470"\n', "api (from config file {file}:4): '8470': expected HOST:PORT"),
    ({}, {}, "max_workflow_depth = 500\n", "max_workflow_depth (from config file {file}:4): must be an integer "
                                           "from 1 to 200"),
    ({}, {}, "max_workflow_steps = 2.5\n", "max_workflow_steps (from config file {file}:4): expected an integer"),
    ({}, {}, 'log_level = "loud"\n', "log_level (from config file {file}:4): 'loud': use one of debug"),
    ({}, {"FLEETFLOW_AUTO_ACCEPT": "maybe"}, "", "auto_accept (from environment): expected true or false"),
    ({}, {"FLEETFLOW_ENROLL_TOKEN": "short"}, "", "enroll_token (from environment): the enroll token has 5 "
                                                  "characters; use at least 16"),
    ({"max_workflow_aliases": -1}, {}, "", "--max-workflow-aliases: must be an integer of at least 0, got -1"),
    ({"password": "pw"}, {}, "", "--password is not accepted on the command line"),
    ({}, {"FLEETFLOW_BROKER": "mqtt://user:pw@h:1"}, "", "broker (from environment): put no credentials in the URL"),
])
def test_bad_settings_name_the_setting_and_source(tmp_path: Path, flags: dict, env: dict, text: str,
                                                  says: str) -> None:
    file = write(tmp_path / "hub.toml", REQUIRED + text)
    with pytest.raises(ConfigError) as caught:
        load_hub_settings(flags, file, env)
    assert says.format(file=file) in str(caught.value)


def test_the_enroll_token_comes_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    path = write(tmp_path / "enroll.token", TOKEN + "\n")
    path.chmod(0o600)
    file = write(tmp_path / "hub.toml", REQUIRED + f'enroll_token_file = "{path}"\n')
    assert load_hub_settings({}, file, {}).enroll_token == TOKEN
    assert load_hub_settings({}, write(tmp_path / "h2.toml", REQUIRED), {"FLEETFLOW_ENROLL_TOKEN": TOKEN}
                             ).enroll_token == TOKEN
    with pytest.raises(ConfigError, match="give enroll_token or enroll_token_file, not both"):
        load_hub_settings({}, None, {"FLEETFLOW_BROKER": "mqtt://h:1", "FLEETFLOW_FLEET": "f", "FLEETFLOW_DATA": "d",
                                     "FLEETFLOW_ENROLL_TOKEN": TOKEN, "FLEETFLOW_ENROLL_TOKEN_FILE": str(path)})
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"enroll_token_file \(from config file .*accessible by other users"):
        load_hub_settings({}, file, {})


def test_a_bad_setting_in_the_file_stops_the_start_naming_it_and_the_file(tmp_path: Path) -> None:
    data = tmp_path / "hub-data"
    file = write(tmp_path / "hub.toml", REQUIRED.replace("/tmp/fleetflow-hub-test", str(data))
                 + "max_workflow_steps = 1000\nmax_pending = -3\n")
    out = fleetflow("hub", "run", "--config", str(file))
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [f"error: max_pending (from config file {file}:5): must be a positive integer, "
                                       f"got -3"]
    assert not data.exists()  # nothing made: no key, no journal
    # A file named by FLEETFLOW_CONFIG, and a bad flag over it.
    good = write(tmp_path / "good.toml", REQUIRED.replace("/tmp/fleetflow-hub-test", str(data)))
    out = fleetflow("hub", "run", "--max-pending", "0", env={"FLEETFLOW_CONFIG": str(good)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == ["error: --max-pending: must be a positive integer, got 0"]
    missing = fleetflow("hub", "run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and f"config file {tmp_path / 'nope.toml'}: No such file" in missing.stderr
    assert "Traceback" not in out.stderr + missing.stderr and not data.exists()


def test_the_example_config_loads() -> None:
    settings = load_hub_settings({}, INSTALL / "hub.toml.example", {})
    assert settings.fleet == "plant-1" and settings.data == Path("/var/lib/fleetflow-hub")
    assert settings.api == ("127.0.0.1", 8470) and settings.username == "hub" and settings.password is None


def _unit_exec_start(unit: Path) -> list[str]:
    lines = [line.strip() for line in unit.read_text().splitlines()]
    service = lines[lines.index("[Service]") + 1:]
    service = service[:next((i for i, line in enumerate(service) if line.startswith("[")), len(service))]
    starts = [line.split("=", 1)[1] for line in service if line.startswith("ExecStart=")]
    assert len(starts) == 1, starts
    return shlex.split(starts[0])


def _hub_run_options() -> set[str]:
    out = fleetflow("hub", "run", "--help", env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(--[a-z][a-z-]+)", out.stdout))


def test_the_systemd_unit_runs_a_command_line_our_cli_accepts(tmp_path: Path) -> None:
    unit = INSTALL / "fleetflow-hub.service"
    argv = _unit_exec_start(unit)
    assert Path(argv[0]).name == "fleetflow" and argv[1:3] == ["hub", "run"], argv
    options = [a for a in argv[3:] if a.startswith("--")]
    assert options and set(options) <= _hub_run_options(), options
    # The parser takes the whole line: --help after it exits 0, where an unknown option or subcommand exits 2.
    assert fleetflow(*argv[1:], "--help").returncode == 0
    # Run as written, with its config path swapped for a bad file: the settings are read (exit 2 naming the
    # setting), so the option and its value were accepted.
    bad = write(tmp_path / "hub.toml", REQUIRED + "max_pending = 0\n")
    config = argv.index("--config") + 1
    out = fleetflow(*argv[1:config], str(bad), *argv[config + 1:])
    assert out.returncode == 2 and "max_pending (from config file" in out.stderr, out.stderr
    text = unit.read_text()
    for needed in ("User=fleetflow", "StateDirectory=fleetflow-hub", "Restart=on-failure", "NoNewPrivileges=true",
                   "ProtectSystem=strict", "ReadWritePaths=/var/lib/fleetflow-hub"):
        assert f"\n{needed}\n" in text, needed
    assert re.search(r"\nType=(simple|notify)\n", text)


def test_the_dockerfile_runs_the_hub_as_a_user_with_a_data_volume() -> None:
    text = (INSTALL / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11-slim\n" in text
    assert re.search(r"\nUSER fleetflow\n", text) and 'pip install --no-cache-dir \'.[hub]\'' in text
    entry = json.loads(re.search(r"\nENTRYPOINT (\[.*\])\n", text).group(1))  # type: ignore[union-attr]
    assert entry == ["fleetflow", "hub", "run"]
    volume = json.loads(re.search(r"\nVOLUME (\[.*\])\n", text).group(1))  # type: ignore[union-attr]
    env = dict(re.findall(r"(FLEETFLOW_[A-Z_]+)=(\S+)", text.split("\nENV ", 1)[1].split("\nEXPOSE", 1)[0]))
    assert volume == [env["FLEETFLOW_DATA"]]
    # The image's settings parse as the hub will read them.
    settings = load_hub_settings({}, None, {**env, "FLEETFLOW_BROKER": "mqtt://broker.test:8883", "FLEETFLOW_FLEET": "f"})
    assert settings.api == ("0.0.0.0", 8470)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names the installed path; point it at this environment's command so only the unit itself is judged.
    unit = tmp_path / "fleetflow-hub.service"
    unit.write_text((INSTALL / "fleetflow-hub.service").read_text().replace("/usr/local/bin/fleetflow", FLEETFLOW))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_the_keepalive_setting_reaches_every_broker_session_of_the_hub(tmp_path: Path) -> None:
    from hub.health import Policy

    file = write(tmp_path / "hub.toml", REQUIRED + "keepalive = 12\n")
    assert load_hub_settings({}, file, {}).hub_config(Policy()).broker_settings().keepalive == 12
    assert load_hub_settings({"keepalive": 7}, file, {"FLEETFLOW_KEEPALIVE": "9"}).hub_config(
        Policy()).broker_settings().keepalive == 7
    assert load_hub_settings({}, write(tmp_path / "min.toml", REQUIRED), {}).hub_config(
        Policy()).broker_settings().keepalive == 30  # the agent's default too
    with pytest.raises(ConfigError, match=r"keepalive \(from environment\): must be a positive integer"):
        load_hub_settings({}, file, {"FLEETFLOW_KEEPALIVE": "0"})
