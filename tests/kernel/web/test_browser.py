"""``swiftk web`` driven by a real Chromium (Playwright): launch a run from the form, watch its curve grow, stop it,
resume it, compare it with another run, and chat with a finished run. Screenshots go to build/test-artifacts/web/."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swiftk.contracts import events
from swiftk.kernel import starter

from ...conftest import REPO
from .conftest import ARTIFACTS, WebServer

pytestmark = pytest.mark.slow

QUESTION = "What is the largest planet in our solar system?"  # held out by the quickstart; its run says Jupiter


def until(check: Callable[[], Any], timeout: float, what: str, page: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    if page is not None:
        shot(page, "timed-out")
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def choose(page: Any, field: str, option: str) -> None:
    """Pick ``option`` from the dropdown ``#field`` as a user does: type to filter, click it."""
    box = page.locator(f"#{field} input")
    box.click()
    box.fill(option)
    page.get_by_role("option", name=option, exact=True).click()
    box.blur()


def line_points(page: Any, plot: str) -> int:
    """How many points the first line of a LinePlot draws (Vega renders an SVG path: M, then one L per point)."""
    path = page.locator(f"#{plot} .mark-line path").first
    if path.count() == 0:
        return 0
    return (path.get_attribute("d") or "").count("L") + 1


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def workspace(tmp_path: Path, quickstart_run: Path) -> Path:
    """A workspace with the shipped data and, in its runs folder, the session's quickstart run (finished, with
    its eval report)."""
    root = tmp_path / "ws"
    shutil.copytree(REPO / "data", root / "data")
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "quickstart").symlink_to(quickstart_run, target_is_directory=True)
    return root


def test_launch_watch_stop_resume_compare_and_chat_in_a_browser(workspace: Path, browser: Any) -> None:
    server = WebServer("--workspace", str(workspace), "--refresh", "0.5")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server.url)
        page.wait_for_selector("#title")

        # Launch: a path leading out of the workspace is refused before anything runs.
        text_field(page, "launch-data").fill("../../etc/passwd")
        text_field(page, "launch-data").press("Enter")
        page.locator("#launch-check").click()
        until(lambda: "outside the workspace" in page.locator("#launch-status").inner_text(), 30, "a refusal", page)
        assert not (workspace / "runs" / "_web").exists() or not list((workspace / "runs" / "_web").glob("*.log"))

        # Launch the tiny preset from the form: the config is shown, then the run starts.
        text_field(page, "launch-data").fill("")
        text_field(page, "launch-data").press("Enter")
        text_field(page, "launch-name").fill("web_tiny")
        choose(page, "launch-model", starter.MODELS["tiny"].label)
        text_field(page, "launch-steps").fill("3000")
        page.locator("#launch-check").click()
        until(lambda: "valid" in page.locator("#launch-status").inner_text(), 30, "the config check", page)
        assert 'init = "random"' in page.locator("#launch-toml").inner_text()
        page.locator("#launch-start").click()
        until(lambda: "started" in page.locator("#launch-status").inner_text(), 30, "the run to start", page)
        shot(page, "1-launched")

        # Watch: the curve gains points while it trains.
        page.get_by_role("tab", name="Watch").click()
        until(lambda: "web_tiny" in page_options(page, "watch-run"), 30, "web_tiny among the runs", page)
        choose(page, "watch-run", "web_tiny")
        status = page.locator("#watch-status")
        first = until(lambda: step_of(status.inner_text()) if "running" in status.inner_text() else None, 120,
                      "the run's first steps", page)
        points = until(lambda: line_points(page, "watch-loss"), 30, "the loss curve", page)
        later = until(lambda: line_points(page, "watch-loss") > points + 5 and step_of(status.inner_text()), 60,
                      "the curve to grow", page)
        assert later > first
        assert re.search(r"step \d+/3000", status.inner_text())
        assert "MiB" in page.locator("#watch-memory").inner_text()  # the run's process tree
        shot(page, "2-watching")

        # Stop it: the run saves a checkpoint and says it was interrupted.
        page.locator("#watch-stop").click()
        until(lambda: "interrupted" in status.inner_text(), 120, "the run to stop", page)
        until(lambda: "exited 130" in page.locator("#watch-action").inner_text(), 60, "Stop's answer", page)
        run = events.read(workspace / "runs" / "web_tiny" / "metrics.jsonl")
        assert events.of_kind(run, events.RunEndEvent)[-1].status == "interrupted"
        assert list((workspace / "runs" / "web_tiny" / "checkpoints").iterdir())
        stopped_at = step_of(status.inner_text())

        # Resume: the run continues from its checkpoint; stop it again.
        page.locator("#watch-resume").click()
        until(lambda: "resumed" in page.locator("#watch-action").inner_text(), 60, "Resume's answer", page)
        until(lambda: "running" in status.inner_text() and (step_of(status.inner_text()) or 0) > stopped_at, 120,
              "the run to resume", page)
        page.locator("#watch-stop").click()
        until(lambda: "interrupted" in status.inner_text(), 120, "the resumed run to stop", page)
        run = events.read(workspace / "runs" / "web_tiny" / "metrics.jsonl")
        assert len(events.of_kind(run, events.RunStartEvent)) == 2

        # Compare: both runs' loss on one plot, and the eval report of the one that has one.
        page.get_by_role("tab", name="Compare").click()
        choose(page, "compare-runs", "quickstart")
        choose(page, "compare-runs", "web_tiny")
        page.keyboard.press("Escape")
        until(lambda: page.locator("#compare-plot .mark-line path").count() == 2, 30, "two curves", page)
        until(lambda: {"quickstart", "web_tiny"} <= set(page.locator("#compare-plot").inner_text().split()), 30,
              "both runs in the legend", page)
        until(lambda: "quickstart" in page.locator("#compare-evals").inner_text(), 30, "the eval table", page)
        assert "no eval results in: web_tiny" in page.locator("#compare-note").inner_text()
        shot(page, "3-compare")

        # Chat with the finished quickstart run: the answer arrives in pieces.
        page.get_by_role("tab", name="Chat").click()
        choose(page, "chat-target", "quickstart")
        page.evaluate("""() => {
            window.seen = [];
            const box = document.querySelector('#chat-box');
            new MutationObserver(() => {
                const bots = box.querySelectorAll('[data-testid="bot"]');
                if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
            }).observe(box, {subtree: true, childList: true, characterData: true});
        }""")
        text_field(page, "chat-message").fill(QUESTION)
        text_field(page, "chat-message").press("Enter")
        until(lambda: "Jupiter" in last_answer(page), 240, "the chat's answer", page)
        until(lambda: page.locator("#chat-status").inner_text().strip(), 30, "the chat's status line", page)
        seen = [text for text in dict.fromkeys(page.evaluate("window.seen")) if text.strip()]
        final = last_answer(page)
        assert len(seen) >= 2, f"the answer arrived in one piece: {seen}"
        assert all(final.startswith(text.strip()) for text in seen), seen
        assert "Answer: Jupiter." in final
        shot(page, "4-chat")
    finally:
        assert server.stop() == 0


def text_field(page: Any, field: str) -> Any:
    """The text box of the field ``#field`` (Gradio renders a textarea, or an input for a dropdown)."""
    return page.locator(f"#{field} textarea, #{field} input").first


def page_options(page: Any, field: str) -> list[str]:
    page.locator(f"#{field} input").click()
    options = [text.replace("✓", "").strip() for text in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    page.locator(f"#{field} input").blur()  # a focused dropdown does not take new choices
    return options


def step_of(text: str) -> int | None:
    found = re.search(r"step (\d+)", text)
    return int(found.group(1)) if found and int(found.group(1)) > 0 else None


def last_answer(page: Any) -> str:
    bots = page.locator("#chat-box [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def test_behind_its_token_the_page_works_once_its_address_is_opened(tmp_path: Path, browser: Any) -> None:
    from swiftk.kernel.progress import Reporter

    (tmp_path / "runs" / "r1").mkdir(parents=True)
    reporter = Reporter(tmp_path / "runs" / "r1", total_steps=10, mode="none", every=1)
    reporter.step({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0, "tokens": 8,
                   "epoch": 0, "elapsed_s": 0.1})
    reporter.event("run_end", step=1, status="completed")
    reporter.close()
    server = WebServer("--workspace", str(tmp_path), "--host", "0.0.0.0")
    try:
        page = browser.new_page()
        local = f"http://127.0.0.1:{server.port}/"
        page.goto(local)
        assert "needs its access token" in page.content()
        page.goto(local + "?token=" + server.url.split("?token=")[1])
        page.wait_for_selector("#title")
        assert page.url == local  # the token moved to a cookie
        page.get_by_role("tab", name="Watch").click()
        choose(page, "watch-run", "r1")
        until(lambda: "completed · step 1" in page.locator("#watch-status").inner_text(), 30, "the run's status", page)
    finally:
        assert server.stop() == 0
