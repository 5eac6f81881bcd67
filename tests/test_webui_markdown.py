"""The chat page renders replies as markdown, safely, in a real headless Chromium.

The model says chosen text (MockEngine's `text`, or a ScriptedEngine the test writes into), so
each test controls exactly what reaches the page. As in test_webui.py, the browser context
bypasses the page's Content-Security-Policy: the safety tests prove the renderer safe on its
own, not by the CSP's help. "Nothing ran" means: no script set `window.__pwned`, no dialog
opened, and the browser asked no host but the server for anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Dialog, Page, Request

from chatstream_asgi.engine.mock import MockEngine

from . import test_webui as page_tests
from .conftest import LiveServer
from .test_webui import ScriptedEngine, engine_app, messages, mock_app, send, wait_for_replies

# The page fixtures, shared with the page's other tests.
browser = page_tests.browser
open_page = page_tests.open_page

# navigator.clipboard as a recorder: what the page copies lands in window.__copied.
CLIPBOARD_RECORDER = """
window.__copied = [];
Object.defineProperty(navigator, "clipboard", {
  configurable: true,
  value: { writeText: (text) => { window.__copied.push(text); return Promise.resolve(); } },
});
"""
# A renderer bug, planted: making an <h6> throws.
H6_THROWS = """
const createElement = Document.prototype.createElement;
Document.prototype.createElement = function (tag, ...rest) {
  if (String(tag).toLowerCase() === "h6") throw new Error("a renderer bug");
  return createElement.call(this, tag, ...rest);
};
"""
# Renders a text with the page's own renderer, into a box of its own: the box's top-level tags
# (none: the reply fell back to plain text), its text, and how deep the elements of a tag nest in it.
RENDER = """async ([text, tag]) => {
  const { renderMarkdown } = await import("./markdown.js");
  const box = document.createElement("div");
  renderMarkdown(box, text);
  let deepest = 0;
  for (let level = box.querySelector(tag); level; level = level.querySelector(tag)) deepest += 1;
  return { tags: [...box.children].map((child) => child.tagName.toLowerCase()), text: box.textContent, deepest };
}"""
DANGEROUS_ELEMENTS = "#log img, #log script, #log iframe, #log [onerror], #log a[href^='javascript:' i]"


def is_foreign(url: str) -> bool:
    return urlparse(url).hostname != "127.0.0.1"


class AttackWatch:
    """What a page did that a reply must never make it do: open dialogs, ask other hosts.

    A request is recorded when the page makes it, even one a CSP would block, and aborted
    before it leaves the machine.
    """

    def __init__(self, page: Page) -> None:
        self.dialogs: list[str] = []
        self.foreign_requests: list[str] = []
        page.on("dialog", self._dialog)
        page.on("request", self._request)
        page.route(is_foreign, lambda route: route.abort())

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _request(self, request: Request) -> None:
        if is_foreign(request.url):
            self.foreign_requests.append(request.url)

    def assert_nothing_ran(self, page: Page) -> None:
        assert page.evaluate("() => window.__pwned") is None
        assert self.dialogs == []
        assert self.foreign_requests == []
        assert page.locator(DANGEROUS_ELEMENTS).count() == 0


def page_saying(text: str, serve: Callable[[Any], LiveServer], open_page: Any, **page: Any) -> Page:
    """A page whose model says `text`, with one turn already done."""
    opened: Page = open_page(serve(engine_app(MockEngine(text=text, tokens_per_second=1000))).url, **page)
    send(opened, "Go")
    wait_for_replies(opened, 1)
    return opened


def attacked_page(text: str, serve: Callable[[Any], LiveServer], open_page: Any) -> Page:
    """A page whose model replies `text`, once it has checked that the reply ran nothing."""
    engine = ScriptedEngine()
    page: Page = open_page(serve(engine_app(engine)).url)
    watch = AttackWatch(page)
    send(page, "Go")
    engine.say(text)
    engine.end()
    wait_for_replies(page, 1)
    watch.assert_nothing_ran(page)
    return page


def reply(page: Page) -> Any:
    return page.locator(".msg.assistant .bubble")


def render(page: Page, text: str, tag: str = "blockquote") -> dict[str, Any]:
    rendered: dict[str, Any] = page.evaluate(RENDER, [text, tag])
    return rendered


def adversarial_markdown() -> str:
    """About 200 KB of markdown made to take a naive renderer quadratic time, or its stack."""
    paragraph = [
        "*a " * 7000,  # emphasis that never closes
        "_a " * 7000,
        "[a " * 7000,  # brackets that never close
        "[a](" * 5000,  # links whose URL never ends
        "".join("`" * size + "x " for size in range(2, 120)) + "`a` " * 3000,  # code spans, unclosed among closed
        "<" + "a" * 10000 + "@" + "a." * 5000,  # an email autolink that never closes
        "http://[" * 3200,  # URLs the browser cannot parse
        "http://a" + ")" * 5000,
        "a" + " " * 10000,  # trailing spaces
        "b",
    ]
    table = "|a" * 1000 + "|\n" + "|-" * 1000 + "|\n" + "x\n" * 5000  # a wide header over short rows
    blocks = ["\n".join(paragraph), "# a" + " " * 10000 + "b", ">" * 5000 + "x", "1. " * 3000 + "x", table]
    return "\n\n".join(blocks)


def test_a_reply_in_markdown_is_shown_formatted(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    text = (
        "## Steps\n\nUse **bold**, *italic* and `code`.\n\n1. First\n2. Second\n   - nested\n\n"
        "> quoted\n\n| Name | Size |\n|---|--:|\n| a | 1 |\n\nSee [the docs](https://example.com/docs)."
    )
    page = page_saying(text, serve, open_page)
    bubble = reply(page)
    assert bubble.locator("h2").text_content() == "Steps"
    assert bubble.locator("p strong").text_content() == "bold"
    assert bubble.locator("p em").text_content() == "italic"
    assert bubble.locator("p code").text_content() == "code"
    assert bubble.locator("ol > li").count() == 2
    assert bubble.locator("ol > li ul > li").text_content() == "nested"
    assert bubble.locator("blockquote").text_content() == "quoted"
    assert bubble.locator("table td").all_text_contents() == ["a", "1"]
    assert bubble.locator("a").get_attribute("href") == "https://example.com/docs"


def test_a_users_message_stays_plain_text(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    text = "**not bold**\n\n  - not a list,   spaces kept"
    page = page_saying("ok", serve, open_page)
    send(page, text)
    wait_for_replies(page, 2)
    user = page.locator(".msg.user .bubble").nth(1)
    assert user.text_content() == text
    assert user.evaluate("bubble => bubble.children.length") == 0
    assert user.evaluate("bubble => getComputedStyle(bubble).whiteSpace") == "pre-wrap"


def test_raw_html_from_the_model_is_shown_as_text_and_never_run(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    text = (
        '<img src=x onerror="window.__pwned=1">\n\n<script>window.__pwned=2</script>\n\n'
        '<a href="javascript:window.__pwned=3">raw link</a> <iframe src="https://example.invalid/"></iframe>'
    )
    page = attacked_page(text, serve, open_page)
    assert messages(page)[1] == ("assistant", text.replace("\n\n", ""))


def test_a_javascript_link_in_markdown_is_not_clickable(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    text = (
        "[click me](javascript:window.__pwned=1) [or me](JavaScript:window.__pwned=2) "
        "[data](data:text/html,<script>window.__pwned=3</script>) <javascript:window.__pwned=4> "
        "[fine](https://example.com/ok) [mail](mailto:someone@example.com)"
    )
    page = attacked_page(text, serve, open_page)
    hrefs = reply(page).locator("a").evaluate_all("links => links.map(link => link.getAttribute('href'))")
    assert hrefs == ["https://example.com/ok", "mailto:someone@example.com"]
    assert "click me" in (reply(page).text_content() or "")


def test_markdown_images_never_load_nor_run(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = attacked_page(
        "![a chart](https://example.invalid/x.png) and ![y](javascript:window.__pwned=1)", serve, open_page
    )
    # The remote image is only a link to it, labelled with its alt text; the other, text.
    image_link = reply(page).locator("a")
    assert (image_link.get_attribute("href"), image_link.text_content()) == ("https://example.invalid/x.png", "a chart")
    assert reply(page).text_content() == "a chart and y"


def test_html_in_a_fenced_code_block_is_shown_as_code_text(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    code = '<img src=x onerror="window.__pwned=1">\n<script>window.__pwned=2</script>'
    page = attacked_page(f"```html\n{code}\n```", serve, open_page)
    assert reply(page).locator("pre code").text_content() == code


def test_each_code_block_has_a_copy_button_that_copies_its_code(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    text = "First:\n\n```python\nprint('one')\n```\n\nThen:\n\n```sh\necho two\n```"
    page = page_saying(text, serve, open_page, init_script=CLIPBOARD_RECORDER)
    buttons = reply(page).locator(".code-block button[aria-label='Copy code']")
    assert buttons.count() == 2
    buttons.nth(1).click()
    page.wait_for_selector(".code-block button[data-copied='yes']")
    assert page.evaluate("() => window.__copied") == ["echo two"]


def test_the_copy_button_of_a_reply_copies_its_markdown_source(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    text = "Some **bold** words.\n\n- a list item"
    page = page_saying(text, serve, open_page, init_script=CLIPBOARD_RECORDER)
    page.click(".msg.assistant button[aria-label='Copy reply']")
    page.wait_for_selector(".msg.assistant button[aria-label='Copy reply'][data-copied='yes']")
    assert page.evaluate("() => window.__copied") == [text]


def test_streamed_markdown_keeps_the_nodes_of_finished_blocks(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    engine = ScriptedEngine()
    page = open_page(serve(engine_app(engine)).url)
    send(page, "Go")
    engine.say("# Title\n\nA finished paragraph.\n\n")
    page.wait_for_selector(".msg.assistant .bubble p")
    # A mark on the finished blocks' nodes: a block rebuilt on a later token would lose it.
    page.evaluate("() => document.querySelectorAll('.msg.assistant .bubble > *').forEach(n => { n.__kept = true; })")
    engine.say("A second")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .bubble p').length === 2")
    engine.say(" paragraph, growing.")
    page.wait_for_function("() => document.querySelector('.msg.assistant .bubble').textContent.endsWith('growing.')")
    engine.end()
    wait_for_replies(page, 1)
    kept = page.evaluate("() => [...document.querySelectorAll('.msg.assistant .bubble > *')].map(n => !!n.__kept)")
    assert kept == [True, True, False]


@pytest.mark.parametrize(
    ("text", "tag", "left_as_text"),
    [
        (">" * 5000 + "x", "blockquote", ">" * 4984 + "x"),
        ("1. " * 5000 + "x", "ol", "1. " * 4984 + "x"),
        ("- " * 5000 + "x", "ul", "- " * 4984 + "x"),
    ],
    ids=["quotes", "ordered-lists", "lists"],
)
def test_blocks_nest_16_deep_and_deeper_markers_are_text(
    text: str, tag: str, left_as_text: str, serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app()).url)
    rendered = render(page, text, tag)
    assert (rendered["tags"], rendered["deepest"], rendered["text"]) == ([tag], 16, left_as_text)


@pytest.mark.parametrize(
    ("text", "tags"), [("- " * 5000, ["hr"]), ("*" * 20000 + "x", ["p"])], ids=["a-rule", "a-run-of-stars"]
)
def test_long_runs_of_markers_render(
    text: str, tags: list[str], serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app()).url)
    assert render(page, text)["tags"] == tags


def test_200_kb_of_adversarial_markdown_renders_as_markdown(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    # A renderer quadratic in any of these patterns takes minutes on this input (the old one took
    # seconds on a quarter of it): the suite's per-test timeout fails it. No wall time is asserted.
    page = open_page(serve(mock_app()).url)
    text = adversarial_markdown()
    assert len(text) > 200_000
    rendered = render(page, text)
    assert rendered["tags"] == ["p", "h1", "blockquote", "ol", "div", "p"]  # rendered, not fallen back to text


def test_a_conversation_with_adversarial_markdown_streams_and_reloads(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    engine = ScriptedEngine()
    page = open_page(serve(engine_app(engine)).url)
    send(page, "Go")
    engine.say(adversarial_markdown())
    engine.end()
    wait_for_replies(page, 1)
    page.reload()
    page.wait_for_selector("#send:enabled")
    assert reply(page).evaluate("bubble => [...bubble.children].map(child => child.tagName)") == [
        "P", "H1", "BLOCKQUOTE", "OL", "DIV", "P"
    ]  # fmt: skip


def test_a_reply_the_renderer_fails_on_shows_as_plain_text_and_the_page_goes_on(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    text = "###### A heading the renderer cannot make\n\nand **bold** after it"
    page = page_saying(text, serve, open_page, init_script=H6_THROWS)
    assert (reply(page).text_content(), reply(page).evaluate("bubble => bubble.children.length")) == (text, 0)
    send(page, "Again")  # the page is not left busy
    wait_for_replies(page, 2)
    page.reload()  # and its history still loads
    page.wait_for_selector("#send:enabled")
    assert messages(page)[1] == ("assistant", text)
