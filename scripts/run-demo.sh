#!/usr/bin/env bash
# Starts the demo downstream app in the background and the gateway in the foreground.
# Ctrl-C (or the gateway exiting for any reason) stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
CONFIG=${CONFIG:-config.yaml}

"$VENV/bin/python" demo/downstream.py --port 9001 --gateway http://127.0.0.1:8080 &
demo_pid=$!
trap 'kill "$demo_pid" 2>/dev/null || true; wait "$demo_pid" 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$VENV/bin/impersonation-gateway" serve --config "$CONFIG"
