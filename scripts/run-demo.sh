#!/usr/bin/env bash
# `make run`: the demo downstream app and the gateway, side by side. Ctrl-C (or either of them stopping for any
# reason) stops both.
#
# Every address they will listen on (the gateway's server.port, its admin.port when admin.tokens is set, the
# demo app's DEMO_PORT) is tried first: one that is taken stops it here with one line and exit status 1, before
# anything starts. (Something may still take a port between that check and the start: the process that then
# cannot listen says so in one line of its own, and the other one is stopped.)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
CONFIG=${CONFIG:-config.yaml}
DEMO_PORT=${DEMO_PORT:-9001}  # config.yaml's apps have their upstream there

# Prints the gateway's URL for the demo app, or one line on stderr and exit 1 when an address is taken. A config
# it cannot read is left to the gateway, which says what is wrong with it.
gateway_url=$("$VENV/bin/python" - "$CONFIG" "$DEMO_PORT" <<'EOF'
import errno
import socket
import sys

from gateway.app import ListenError
from gateway.config import ConfigError, load_config

try:
    config = load_config(sys.argv[1])
except ConfigError:
    print("http://127.0.0.1:8080")
    sys.exit(0)
server, admin = config.server, config.admin
listeners = [(server.host, server.port, f"the gateway's {config.setting('server.port')}")]
if admin.port is not None and admin.listens:
    listeners.append((admin.host, admin.port, f"the gateway's {config.setting('admin.port')}"))
listeners.append(("127.0.0.1", int(sys.argv[2]), "the demo app's port, DEMO_PORT"))
for host, port, what in listeners:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
            probe.listen()
        except OSError as exc:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                line = f"something is already listening on {address} ({what}) — is make run already running?"
            else:
                line = str(ListenError(host, port, what, exc))
            print(f"make run: {line}", file=sys.stderr)
            sys.exit(1)
host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
print(f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}")
EOF
)

echo "make run: the CLI is $VENV/bin/impersonation-gateway (or '. $VENV/bin/activate' first); Ctrl-C stops all"

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$VENV/bin/python" demo/downstream.py --port "$DEMO_PORT" --gateway "$gateway_url" &
pids+=($!)
"$VENV/bin/impersonation-gateway" serve --config "$CONFIG" &
pids+=($!)

# The first of the two to stop ends the run, with its exit status (Ctrl-C stops both cleanly: 0).
status=0
wait -n "${pids[@]}" || status=$?
exit "$status"
