"""Where a Chromium is on this machine, for what drives the page from a real browser (the tests, and
``bench/web_latency.py``): Playwright launched with ``executable_path`` set to it needs no browser download."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CANDIDATES = ("/usr/lib/chromium/chromium",  # Debian's `chromium` package (/usr/bin/chromium is a shell wrapper)
              "/usr/lib/chromium-browser/chromium-browser", "/snap/bin/chromium")
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> Path | None:
    """``$SWIFTK_CHROMIUM``, else Debian's binary, else the first Chromium-like program on PATH; None if none."""
    given = os.environ.get("SWIFTK_CHROMIUM")
    if given:
        return Path(given) if Path(given).is_file() else None
    for candidate in CANDIDATES:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None
