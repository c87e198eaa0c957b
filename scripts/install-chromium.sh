#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver when they are missing: the real-browser test
# (tests/test_browser_label_studio.py) drives a headless Chromium with selenium. Nothing is downloaded
# outside the package manager (selenium is given the driver's path, so Selenium Manager stays idle).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
if (have chromium || have chromium-browser) && have chromedriver; then
    exit 0
fi
if ! have apt-get; then
    echo "chromium and chromedriver are missing and apt-get is not available: install Chromium and its matching" \
         "chromedriver with your package manager, or point TAXOMOCO_TEST_CHROMIUM / TAXOMOCO_TEST_CHROMEDRIVER at them" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif have sudo; then
    SUDO="sudo"
else
    echo "chromium is missing; run as root: apt-get install -y chromium chromium-driver" >&2
    exit 1
fi
echo "installing chromium and chromium-driver with apt-get"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
have chromedriver
