"""``swiftk web`` over HTTP: loopback by default; any other bind needs the access token."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import WebServer


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_bound_to_every_address_every_request_needs_the_token(tmp_path: Path) -> None:
    server = WebServer("--workspace", str(tmp_path), "--host", "0.0.0.0")
    try:
        assert "?token=" in server.url
        token = server.url.split("?token=")[1]
        base = f"http://127.0.0.1:{server.port}"
        for path in ("/", "/config", "/gradio_api/info"):
            code, _, body = get(base + path)
            assert code == 401 and "needs its access token" in body, path
        assert get(base + "/?token=wrong-token-wrong-token")[0] == 401
        code, headers, _ = get(f"{base}/?token={token}")
        assert code == 303 and headers["location"] == "/"  # the token leaves the address for a cookie
        cookie = headers["set-cookie"].split(";")[0]
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
        code, _, body = get(base + "/", {"Cookie": cookie})
        assert code == 200 and "gradio" in body.lower()
        assert get(base + "/config", {"Authorization": f"Bearer {token}"})[0] == 200
        assert post(base + "/gradio_api/upload", b"x", {"Authorization": f"Bearer {token}"})[0] == 403
        assert get(base + "/", {"Cookie": cookie, "Host": "attacker.example"})[0] == 200  # the token is the guard
    finally:
        assert server.stop() == 0


def test_on_loopback_no_token_is_asked_but_other_sites_names_and_uploads_are_refused(tmp_path: Path) -> None:
    server = WebServer("--workspace", str(tmp_path))
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert "token" not in server.url and server.url.startswith("http://localhost:")
        assert get(base + "/")[0] == 200
        assert get(base + "/", {"Host": f"localhost:{server.port}"})[0] == 200
        assert get(base + "/", {"Host": "attacker.example"})[0] == 400  # DNS rebinding: another name for us
        code, _, body = post(base + "/gradio_api/upload", b"x")
        assert code == 403 and "no uploads" in body
    finally:
        assert server.stop() == 0


def post(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {}, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {}, exc.read().decode()


@pytest.mark.parametrize(("args", "message"), [
    (["--host", "0.0.0.0", "--token", "short"], "--token: at least 16 characters"),
    (["--refresh", "0.01"], "--refresh 0.01: at least 0.2 seconds"),
    (["--workspace", "/no/such/folder"], "is not a folder"),
])
def test_bad_arguments_exit_2_with_the_reason(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "swiftk", "web", "--port", "0", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_busy_port_exits_2_naming_it(tmp_path: Path) -> None:
    server = WebServer("--workspace", str(tmp_path))
    try:
        done = subprocess.run([sys.executable, "-m", "swiftk", "web", "--workspace", str(tmp_path), "--port",
                               str(server.port)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in done.stderr, done.stderr
    finally:
        assert server.stop() == 0
