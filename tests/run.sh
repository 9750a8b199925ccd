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

collected_none() {
  echo "tests/run.sh: pytest collected no tests in $1; that is a failure" >&2
}

set +e
if [ "$#" -gt 0 ]; then
  .venv/bin/python -m pytest "$@"
  rc=$?
  [ "$rc" -eq 5 ] && { collected_none "$*"; rc=1; }
  exit "$rc"
fi
# The whole suite as two pytest runs side by side, both of which must pass. Beside: the unit tests (pure and
# CPU-bound, about 95 s) and the benches' smoke run (about 100 s, the longest single test). The main run: every other
# test (mostly waiting on brokers, hubs and agents; built to pass on a busy machine). This keeps the suite well inside
# its 15 minutes on 2 cores. A new test folder or file lands in the main run, so none is left out.
BESIDE=(tests/unit tests/system/test_bench_smoke.py)
beside_log="$(mktemp)"
.venv/bin/python -m pytest -p no:cacheprovider "${BESIDE[@]}" > "$beside_log" 2>&1 &
beside_pid=$!
.venv/bin/python -m pytest tests "${BESIDE[@]/#/--ignore=}"
rc=$?
wait "$beside_pid"
beside_rc=$?
echo "---- ${BESIDE[*]} (run beside the above) ----"
cat "$beside_log"
rm -f "$beside_log"
[ "$rc" -eq 5 ] && { collected_none "tests (but ${BESIDE[*]})"; rc=1; }
[ "$beside_rc" -eq 5 ] && { collected_none "${BESIDE[*]}"; beside_rc=1; }
[ "$rc" -ne 0 ] && exit "$rc"
exit "$beside_rc"
