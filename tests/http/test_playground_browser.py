"""The playground in a real browser: Debian's headless chromium, driven by playwright (no
browser download: `executable_path`), against `python -m server` on a tiny random
checkpoint with an API key. It checks what a person would: the page loads, asks for the
key, streams one prompt into a column per exit, the budget slider moves the exit the
server would pick, "send with this budget" shows the depth that served it, the live strip
counts the requests, and a bad request's 400 is shown readably. Screenshots land in the
test's tmp dir, and in $SOFT_SCREENSHOT_DIR when set (CI's artifacts)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import PROFILE, make_served_checkpoint
from tests.test_server_e2e import Server, serving

CHROMIUM = shutil.which("chromium")
KEY = "playground-test-key"
# a closed network and a throwaway profile: nothing phones home, nothing is kept
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or importlib.util.find_spec("playwright") is None,
        reason="needs Debian's chromium (apt-get install chromium) and playwright (.[dev])",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("playground")
    ckpt = make_served_checkpoint(tmp / "tiny", profile=PROFILE)
    with serving(ckpt, tmp / "server.log", "--api-key", KEY) as srv:
        yield srv


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if out := os.environ.get("SOFT_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / name)
    return path


# the slider's position (0..1000, log scale over state.range) of the geometric mean of the
# shallowest and the deepest exit's current predictions
BETWEEN = """(() => {
  const ms = state.plan.exits.map((x) => x.predicted_ms);
  const mid = Math.sqrt(Math.min(...ms) * Math.max(...ms));
  const [lo, hi] = state.range;
  return Math.round(1000 * Math.log(mid / lo) / Math.log(hi / lo));
})()"""


def set_slider(page: Any, position: int) -> None:
    page.locator("#budget").evaluate(
        "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input')); }", position
    )


def test_playground_in_headless_chromium(server: Server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        page = browser.new_page()
        page.set_default_timeout(30_000)
        console_errors: list[str] = []
        page.on("pageerror", lambda e: console_errors.append(str(e)))
        try:
            drive(page, server.url, tmp_path)
        finally:
            screenshot(page, tmp_path, "playground-last.png")
            browser.close()
        assert console_errors == []


def drive(page: Any, url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.goto(url + "/")
    # 1) the page loads and describes the model; without the key, /v1 is refused readably
    expect(page.locator("#model-info")).to_contain_text("exits 2, 4")
    expect(page.locator("#exit-picks input")).to_have_count(2)
    expect(page.locator("#live-summary")).to_contain_text("enter the API key")
    page.click("#run")
    expect(page.locator(".column .error")).to_have_count(2)
    expect(page.locator(".column .error").first).to_contain_text("401")
    expect(page.locator("#banner")).to_contain_text("API key")

    # 2) with the key: the live strip, then one prompt streamed at each exit side by side
    page.fill("#api-key", KEY)
    expect(page.locator("#live-depths .cap")).to_have_attribute("data-cap", "4")
    page.fill("#prompt", "The capital of France is")
    page.fill("#max-tokens", "24")
    page.click("#run")
    columns = page.locator(".column")
    expect(columns).to_have_count(2)
    expect(page.locator(".column.done")).to_have_count(2)
    expect(page.locator("#banner")).to_be_hidden()
    for i, depth in enumerate((2, 4)):
        col = columns.nth(i)
        assert col.get_attribute("data-depth") == str(depth)
        expect(col.locator("h3")).to_contain_text(f"depth {depth}")
        assert col.locator(".text").inner_text().strip(), f"depth {depth}: no text"
        # streamed: the answer arrived (and was shown) in several pieces, not one body
        assert int(col.get_attribute("data-chunks") or 0) > 1
        assert re.fullmatch(r"[\d.]+ m?s", col.locator(".ttft").inner_text())
        assert re.fullmatch(r"[\d.]+ m?s", col.locator(".total").inner_text())
        assert int(col.locator(".tokens").inner_text()) >= 2
        assert re.fullmatch(r"[\d.]+", col.locator(".tps").inner_text())
    # the two answers differ: each column really ran at its own depth
    texts = [columns.nth(i).locator(".text").inner_text() for i in range(2)]
    assert texts[0] != texts[1]

    # 3) the budget slider moves the exit the server would pick; sending shows x-soft-depth
    pick = page.locator("#plan-pick")
    set_slider(page, 1000)  # twice the deepest exit's prediction: the deepest fits
    expect(pick).to_have_attribute("data-depth", "4")
    expect(pick).to_contain_text("would pick depth 4")
    with page.expect_response("**/v1/chat/completions") as sent:
        page.click("#send-budget")
    assert sent.value.request.headers["x-latency-budget"].endswith("ms")
    # the page shows the x-soft-depth the server answered with: 4, unless this busy
    # machine made the request fall behind its deadline (then moved to depth 2 mid-way)
    served = sent.value.headers["x-soft-depth"]
    assert served in ("2", "4")
    expect(page.locator("#budget-result .served")).to_have_attribute("data-depth", served)
    set_slider(page, 0)  # half the shallowest's: nothing fits, the shallowest serves
    expect(pick).to_have_attribute("data-depth", "2")
    expect(pick).to_contain_text("No exit fits")
    expect(page.locator("#plan-bars .chosen.label")).to_have_text("depth 2")
    page.click("#send-budget")
    expect(page.locator("#budget-result .served")).to_have_attribute("data-depth", "2")
    expect(page.locator("#budget-result")).to_contain_text("x-soft-depth 2")

    # 4) the live strip counts what finished at each depth: the four requests above (the
    # 401s never reached a depth; a request that fell behind its deadline finishes, and
    # is counted, at the shallower exit it was moved to)
    page.wait_for_function(
        """() => [...document.querySelectorAll('.live-depth[data-requests]')]
                 .reduce((n, e) => n + Number(e.dataset.requests), 0) === 4"""
    )
    expect(page.locator('.live-depth[data-depth="2"]')).to_contain_text("requests since start")
    # between the two exits' predictions: depth 2 fits, depth 4 does not
    set_slider(page, page.evaluate(BETWEEN))
    expect(pick).to_contain_text("would pick depth 2")
    expect(page.locator("#plan-bars .fits.label")).to_have_count(0)  # 2 is "chosen"
    expect(page.locator("#plan-bars .over.label")).to_have_text("depth 4")
    screenshot(page, tmp_path, "playground.png")

    # 5) a bad request: its 400 is shown in each column and the banner, the page goes on
    page.fill("#max-tokens", "100000")
    page.click("#run")
    expect(page.locator(".column .error")).to_have_count(2)
    err = page.locator(".column .error").first
    expect(err).to_contain_text("400")
    expect(err).to_contain_text("context window is 256 tokens")
    expect(page.locator("#banner")).to_contain_text("max_tokens")
    expect(pick).to_contain_text("400")  # the plan refuses the same sizes
    # a 429 reads as well as a 400 does (the page's one error formatter)
    line = page.evaluate(
        """describe(429, "Too Many Requests",
           JSON.stringify({error: {message: "the queue is full", type: "rate_limit_error",
                                   param: null, code: "queue_full"}}), "2")"""
    )
    assert line == (
        "429 Too Many Requests: the queue is full (rate_limit_error, queue_full) — retry after 2 s"
    )
    screenshot(page, tmp_path, "playground-error.png")
    page.fill("#max-tokens", "8")
    page.click("#run")
    expect(page.locator(".column.done")).to_have_count(2)
