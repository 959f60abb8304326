"""docs/playground.png from the real thing: `python -m server` on a model (the default
unless --model), the playground page in Debian's headless chromium (playwright, no
browser download), one prompt run greedily at every exit side by side, the budget slider
halfway, then a full-page screenshot.

    python -m benchmarks.playground_shot            # writes docs/playground.png

The times in the picture are this machine's at the moment it ran (say its load beside
the picture); the answers are greedy, so they are the model's own at each depth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks.peers import Launch, ServerProcess, Skip, free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
PROMPT = "Explain in two sentences why the sky is blue."


def shoot(url: str, prompt: str, max_tokens: int, out: Path, profile: Path) -> int:
    """Drive the page at `url`; returns how many exit columns finished."""
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise Skip("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 900},
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.set_default_timeout(300_000)
            page.goto(url + "/")
            expect(page.locator("#exit-picks input").first).to_be_visible()
            exits = page.locator("#exit-picks input").count()
            page.fill("#prompt", prompt)
            page.fill("#max-tokens", str(max_tokens))
            page.fill("#temperature", "0")
            page.click("#run")
            expect(page.locator(".column.done")).to_have_count(exits)
            page.locator("#budget").evaluate(
                "el => { el.value = '500'; el.dispatchEvent(new Event('input')); }"
            )
            expect(page.locator("#plan-pick")).to_contain_text("depth")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            return exits
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="what `soft-serve --model` takes")
    ap.add_argument("--prompt", default=PROMPT, help="the chat message sent at every exit")
    ap.add_argument("--max-tokens", type=int, default=48, help="answer tokens per exit")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    ap.add_argument("--threads", type=int, default=2, help="the server's threads")
    args = ap.parse_args(argv)
    port = free_port()
    argv_ = [sys.executable, "-m", "server", "--model", args.model, "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    work = ROOT / "runs" / "playground_shot"
    server = ServerProcess(Launch(argv_, env, args.model), f"http://127.0.0.1:{port}",
                           work / "server.log", start_timeout_s=600)  # fmt: skip
    try:
        server.wait_ready()
        exits = shoot(server.url, args.prompt, args.max_tokens, args.out, work / "profile")
    except Skip as e:
        print(f"benchmarks.playground_shot: {e}", file=sys.stderr)
        return 2
    finally:
        server.stop()
    print(f"wrote {args.out} ({exits} exits; load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
