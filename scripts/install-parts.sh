#!/usr/bin/env bash
# Installs, with apt-get, each real part the test suite runs that is missing: every one is checked on its
# own, since a machine may have one and not another (redis-server without redis-sentinel, say).
set -euo pipefail

missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
have redis-sentinel || missing+=(redis-sentinel)
have nginx || missing+=(nginx-light)
have chromium || have chromium-browser || missing+=(chromium)  # the browser test drives it with Playwright
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "missing ${missing[*]}: install them (Debian: apt-get install ${missing[*]}), or run as root" >&2
    exit 1
fi
echo "installing ${missing[*]}" >&2
"${as_root[@]}" apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
