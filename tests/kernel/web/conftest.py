"""``swiftk web`` in a subprocess, and the browser that drives it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from swiftk.kernel.web.browser import chromium_path

from ...conftest import ServerProcess

ARTIFACTS = Path(__file__).resolve().parents[3] / "build" / "test-artifacts" / "web"  # screenshots


class WebServer(ServerProcess):
    """``swiftk web ... --port 0`` read until it prints its address."""

    def __init__(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> None:
        super().__init__(["web", "--port", "0", *args], " at http://", timeout, cwd=cwd)
        self.url = self.line.split(" at ")[-1].strip()
        self.base = self.url.split("?")[0]
        self.port = int(self.base.rstrip("/").rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def chromium() -> Path:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on this machine (`apt-get install chromium`, which `make test` does where it may, "
                    "or set SWIFTK_CHROMIUM): the browser tests of `swiftk web` did not run")
    return path


@pytest.fixture
def browser(chromium: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium))
        yield launched
        launched.close()
