"""How fast ``swiftk web`` shows a run, driven by a real Chromium (Playwright, Debian's chromium).

    .venv/bin/python bench/web_latency.py [--steps 60] [--rate 4] [--refresh 1.0]

In one process: a workspace in a temporary folder holds one run whose ``metrics.jsonl`` this script writes as a
training run does (``kernel.progress.Reporter``: a ``run_start``, then ``--rate`` step records a second, each with
this process as the run's pid, so the page sees a live run). ``swiftk web --refresh R`` serves it; the browser
opens the page and watches the run.

- ``first_paint_ms``: the browser's first contentful paint of the page, from navigation start;
  ``ready_ms``: until the page's own title is in the DOM (Gradio has built the tabs).
- ``refresh_ms_p50/p95/max``: per step record, from its write (wall clock, after the flush) to the Watch tab's
  status line naming that step (a MutationObserver in the page, same wall clock). The loss curve is updated by
  the same response as the status line. The goal is <= 2 s.
- ``web_rss_mib_idle`` / ``web_rss_mib_watching``: resident memory of the ``swiftk web`` process after the first
  paint and after watching every step.
- The baseline is what a user had before the page: ``swiftk plot`` redrawing the PNG of the same run once
  (``plot_s``), which the user must rerun and reopen by hand for every refresh.

Prints one JSON line; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="step records to write (default 60)")
    parser.add_argument("--rate", type=float, default=4.0, help="step records per second (default 4)")
    parser.add_argument("--refresh", type=float, default=1.0, help="swiftk web --refresh (default 1, its default)")
    args = parser.parse_args()

    import psutil
    from playwright.sync_api import sync_playwright

    from swiftk.kernel.plot import plot
    from swiftk.kernel.progress import Reporter
    from swiftk.kernel.web.browser import chromium_path

    chromium = chromium_path()
    if chromium is None:
        sys.exit("no Chromium: `apt-get install chromium` (or set SWIFTK_CHROMIUM)")
    root = Path(tempfile.mkdtemp(prefix="swiftk-web-bench-"))
    run_dir = root / "runs" / "bench"
    run_dir.mkdir(parents=True)
    reporter = Reporter(run_dir, total_steps=args.steps, mode="none", every=1)
    reporter.event("run_start", step=0, total_steps=args.steps, world_size=1, stage="sft", pid=os.getpid(),
                   host=socket.gethostname())
    reporter.step(record(1))
    written = {1: time.time()}

    server = subprocess.Popen([sys.executable, "-m", "swiftk", "web", "--workspace", str(root), "--port", "0",
                              "--refresh", str(args.refresh)], stdout=subprocess.PIPE, text=True)
    url = wait_for_url(server)
    web = psutil.Process(server.pid)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(chromium))
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            started = time.time()
            page.goto(url)
            page.wait_for_selector("#title")
            ready_ms = (time.time() - started) * 1000
            first_paint_ms = page.evaluate(
                "() => performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null")
            rss_idle = web.memory_info().rss / 2**20

            page.get_by_role("tab", name="Watch").click()
            box = page.locator("#watch-run input")
            box.click()
            box.fill("bench")
            page.get_by_role("option", name="bench", exact=True).click()
            box.blur()
            page.wait_for_function("() => /step 1\\//.test(document.querySelector('#watch-status').innerText)")
            page.evaluate("""() => {
                window.shown = {};
                const status = document.querySelector('#watch-status');
                new MutationObserver(() => {
                    const found = /step (\\d+)\\//.exec(status.innerText);
                    if (found && !(found[1] in window.shown))
                        window.shown[found[1]] = performance.timeOrigin + performance.now();
                }).observe(status, {subtree: true, childList: true, characterData: true});
            }""")
            writer = threading.Thread(target=write_steps, args=(reporter, args.steps, args.rate, written))
            writer.start()
            writer.join()
            page.wait_for_function(f"() => '{args.steps}' in window.shown", timeout=30_000)
            shown = {int(k): v / 1000 for k, v in page.evaluate("window.shown").items()}
            rss_watching = web.memory_info().rss / 2**20
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
        reporter.close()

    # A step shown later than a newer one was never displayed alone (the page skipped it): its latency is the
    # time until a status naming it or a later step appeared.
    latencies = []
    for step in range(2, args.steps + 1):
        after = [t for s, t in shown.items() if s >= step]
        latencies.append((min(after) - written[step]) * 1000)
    started = time.perf_counter()
    plot(str(run_dir), str(root / "curves.png"))
    plot_s = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    quantiles = statistics.quantiles(latencies, n=20)
    figures = {
        "bench": "web_latency", "refresh_s": args.refresh, "steps": args.steps, "rate_per_s": args.rate,
        "first_paint_ms": round(first_paint_ms, 1) if first_paint_ms is not None else None,
        "ready_ms": round(ready_ms, 1),
        "refresh_ms_p50": round(statistics.median(latencies), 1), "refresh_ms_p95": round(quantiles[18], 1),
        "refresh_ms_max": round(max(latencies), 1),
        "web_rss_mib_idle": round(rss_idle, 1), "web_rss_mib_watching": round(rss_watching, 1),
        "baseline_plot_s": round(plot_s, 3),
        "goal_refresh_ms": 2000, "goal_met": max(latencies) <= 2000,
    }
    print(json.dumps(figures), flush=True)


def record(step: int) -> dict[str, float]:
    return {"step": step, "loss": 3.0 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 5000.0, "tokens": 512,
            "epoch": 0, "elapsed_s": step * 0.25}


def write_steps(reporter: object, steps: int, rate: float, written: dict[int, float]) -> None:
    for step in range(2, steps + 1):
        time.sleep(1 / rate)
        reporter.step(record(step))  # type: ignore[attr-defined]
        written[step] = time.time()


def wait_for_url(server: subprocess.Popen[str]) -> str:
    assert server.stdout is not None
    for line in server.stdout:
        print(line, end="", file=sys.stderr)
        found = re.search(r" at (http://\S+)", line)
        if found:
            return found.group(1).replace("localhost", "127.0.0.1")
    raise SystemExit(f"swiftk web exited {server.wait()} before printing its address")


if __name__ == "__main__":
    main()
