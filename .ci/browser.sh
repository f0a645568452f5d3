#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the QC report's browser tests (Debian packages), and Selenium.
# Idempotent: installs only what is missing. Needs root (or sudo) for apt-get on a machine without them.
set -euo pipefail

have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if ! have_browser; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
        $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
            chromium chromium-driver fonts-dejavu-core
    else
        echo "browser.sh: no apt-get here; install chromium and chromedriver by hand (the QC browser tests skip)" >&2
    fi
fi

python -c "import selenium" 2>/dev/null || python -m pip install -q selenium
have_browser && chromium --version 2>/dev/null && chromedriver --version || true
