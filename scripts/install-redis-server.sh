#!/usr/bin/env bash
# Install the Debian/Ubuntu redis-server package when no redis-server binary is on PATH.
# The test suite starts its own private server on a free port; the system service is not needed.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing and apt-get is not available: install Redis >= 6 with your package manager" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "redis-server is missing; run as root: apt-get install -y redis-server" >&2
    exit 1
fi
echo "installing redis-server with apt-get"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# the package may start a system service on 6379; the tests do not use it
command -v redis-server >/dev/null
