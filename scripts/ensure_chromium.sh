#!/usr/bin/env bash
# `make test` runs this before the tests: the browser tests of `swiftk web` drive a real Chromium (Debian's
# `chromium` package, no Playwright browser download). Installs it with apt-get where this user may (root, or
# password-less sudo); otherwise says why and those tests skip with that reason. Never fails the build.
set -uo pipefail
PY="${1:-.venv/bin/python}"
if "$PY" -c "import sys; from swiftk.kernel.web.browser import chromium_path; sys.exit(chromium_path() is None)"; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "ensure_chromium: no Chromium and no apt-get here; the browser tests of swiftk web will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ensure_chromium: no Chromium, and installing it needs root; the browser tests of swiftk web will be" \
         "skipped (sudo apt-get install chromium)" >&2
    exit 0
fi
echo "ensure_chromium: installing Debian's chromium for the browser tests of swiftk web (once; a few minutes)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q chromium >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
        || echo "ensure_chromium: apt-get install chromium failed; the browser tests of swiftk web will be skipped" >&2
fi
exit 0
