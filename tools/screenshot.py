"""Screenshot of the chat page after a conversation: `python tools/screenshot.py URL OUT.png --message TEXT ...`.

Opens the page at URL in headless Chromium (Debian's /usr/bin/chromium through PyPI's
playwright; `playwright install` is never needed), sends each `--message` in turn, waits for
each reply to finish, and saves a screenshot of the window. For the docs' picture of the page:
point it at a server running a real model.
"""

from __future__ import annotations

import argparse
import sys

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# A browser that only shows the page: no sandbox (it runs in containers), no GPU, and none of
# Chromium's own calls home, so the only requests are the page's.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPLY_FINISHED = """n => document.querySelectorAll('.msg.assistant').length === n
    && !document.querySelector('.msg.pending') && !document.getElementById('send').hidden"""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Screenshot of the chat page after a conversation.")
    parser.add_argument("url", help="the page, e.g. http://127.0.0.1:8000/")
    parser.add_argument("out", help="where to save the PNG")
    parser.add_argument("--message", action="append", default=[], help="a message to send (repeat for more)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=760)
    parser.add_argument("--color-scheme", choices=["light", "dark"], default="light")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each reply")
    return parser.parse_args(argv)


def converse(page: Page, messages: list[str], timeout_ms: float) -> None:
    """Send each message once the reply before it has finished; wait for the last reply too."""
    page.wait_for_selector("#send:enabled", timeout=timeout_ms)  # the history has loaded
    replies = page.locator(".msg.assistant").count()
    for message in messages:
        page.fill("#input", message)
        page.press("#input", "Enter")
        replies += 1
        page.wait_for_function(REPLY_FINISHED, arg=replies, timeout=timeout_ms)
    page.locator("#input").blur()  # no focus ring in the picture


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    timeout_ms = arguments.timeout * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": arguments.width, "height": arguments.height},
                device_scale_factor=1,
                color_scheme=arguments.color_scheme,
            )
            page = context.new_page()
            page.goto(arguments.url, timeout=timeout_ms)
            converse(page, arguments.message, timeout_ms)
            page.screenshot(path=arguments.out, animations="disabled")
        except PlaywrightError as error:
            print(f"screenshot: {error.message}", file=sys.stderr)
            return 1
        finally:
            browser.close()
    print(arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
