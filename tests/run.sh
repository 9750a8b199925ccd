#!/usr/bin/env bash
# The README's test command: installs what the tests need (Mosquitto, Chromium, a venv with fleetflow[all]), runs
# every test. Extra arguments go to pytest, e.g. `bash tests/run.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

if { ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; } || [ ! -x /usr/bin/chromium ]; then
  # integration tests run a real broker; the dashboard's tests a real browser (Playwright drives this chromium)
  echo "installing mosquitto and chromium"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto chromium >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto chromium >/dev/null; fi
fi
export PATH="$PATH:/usr/sbin"

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all]"
# The agent's dependencies as wheels (the network is allowed here, in the install step): the agent-only install test
# (tests/system/test_install.py) installs from them with --no-index, as a device without internet does.
.venv/bin/python -m pip wheel -q --disable-pip-version-check -w .wheelhouse -r <(.venv/bin/python -c \
  'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
