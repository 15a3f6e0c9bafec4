#!/usr/bin/env bash
# The test command from the README: installs into .venv (once), then lint, types and tests.
# The tests start their own Kafka-protocol broker; they need Redis at FANFARE_TEST_REDIS_URL
# (default redis://127.0.0.1:6379/0) and use their own key prefixes there, and PostgreSQL at
# FANFARE_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test) for the outbox,
# a schema of their own per test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q -e '.[dev]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
set +e
.venv/bin/pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$code"
