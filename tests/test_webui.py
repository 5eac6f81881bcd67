"""The chat page, driven in a real headless Chromium against a real server.

Chromium is Debian's (`apt-get install chromium`), launched through PyPI's playwright with
`executable_path`; `playwright install` is never needed. Without it these tests fail, never
skip: CI installs it. Each test leaves a screenshot in `$CHATSTREAM_ARTIFACTS` (default: a
temporary folder). The browser context bypasses the page's Content-Security-Policy only so
that playwright can evaluate its checks; the escaping test therefore proves that text is
inserted as text on its own, without the CSP's help.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, sync_playwright
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine.mock import MockEngine

from .conftest import HANG_GUARD, LiveServer, ModelHooks, Outcomes, open_chat, read_first_text, wait_until

CHROMIUM = os.environ.get("CHATSTREAM_CHROMIUM", "/usr/bin/chromium")
GUARD_MS = HANG_GUARD * 1000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian), or set CHATSTREAM_CHROMIUM")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[..., Page]]:
    artifacts = Path(os.environ.get("CHATSTREAM_ARTIFACTS") or tempfile.gettempdir()) / "webui"
    artifacts.mkdir(parents=True, exist_ok=True)
    pages: list[Page] = []
    errors: list[str] = []

    def open_(url: str, width: int = 1000, height: int = 720) -> Page:
        context = browser.new_context(bypass_csp=True, viewport={"width": width, "height": height})
        page = context.new_page()
        page.set_default_timeout(GUARD_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        page.wait_for_selector("#send:enabled")  # the history has loaded
        pages.append(page)
        return page

    yield open_
    for index, page in enumerate(pages):
        page.screenshot(path=str(artifacts / f"{request.node.name}-{index}.png"))
        page.context.close()
    assert not errors, f"the page's script failed: {errors}"


def mock_app(**middleware: Any) -> ChatStreamMiddleware:
    """The page in front of the mock engine, which echoes what it is told."""
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=200))
    return ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True, **middleware)


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_for_replies(page: Page, count: int) -> None:
    """Wait until `count` replies are on the page and none is still streaming."""
    page.wait_for_function(
        """n => document.querySelectorAll('.msg.assistant').length === n
            && !document.querySelector('.msg.pending') && !document.getElementById('send').hidden""",
        arg=count,
    )


def messages(page: Page) -> list[tuple[str, str]]:
    result: list[tuple[str, str]] = page.evaluate(
        """() => [...document.querySelectorAll('.msg')].map(m =>
            [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.bubble').textContent])"""
    )
    return [tuple(pair) for pair in result]  # type: ignore[misc]


def server_history(page: Page) -> list[dict[str, Any]]:
    """The conversation the server keeps for the page's cookie."""
    history: dict[str, Any] = page.evaluate("() => fetch('get_history').then(r => r.json())")
    return list(history["messages"])


def test_the_reply_grows_on_the_page_as_the_model_generates_it(
    make_chat_stream: Callable[..., ChatStream], hooks: ModelHooks, serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    hooks.step_delay = 0.03  # a slow model, on its own thread
    chat_stream = make_chat_stream(max_new_tokens=30)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True))
    page = open_page(server.url)
    send(page, "Tell me a story")
    lengths: set[int] = set()

    def reply_finished() -> bool:
        state = page.evaluate(
            """() => { const r = document.querySelector('.msg.assistant');
                return [r ? r.querySelector('.bubble').textContent.length : 0,
                        !!r && !r.classList.contains('pending') && !document.getElementById('send').hidden]; }"""
        )
        lengths.add(state[0])
        return bool(state[1])

    assert wait_until(reply_finished)
    assert len(lengths - {0}) >= 3, f"the reply appeared all at once: lengths seen {sorted(lengths)}"
    assert messages(page)[0] == ("user", "Tell me a story")


def test_stop_ends_the_reply_and_the_server_stops_the_model(
    make_chat_stream: Callable[..., ChatStream], hooks: ModelHooks, serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    hooks.step_delay = 0.05
    outcomes = Outcomes()
    chat_stream = make_chat_stream(max_new_tokens=200)
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True, callback=outcomes)
    page = open_page(serve(app).url)
    send(page, "Go on and on")
    page.wait_for_function("() => document.querySelector('.msg.assistant .bubble').textContent.length > 0")
    page.click("#stop")
    assert outcomes.wait() == ["client_disconnected_while_streaming"]
    stats = outcomes.calls[0][0].state.chat_generation
    assert stats.finish_reason == "cancelled"
    assert stats.steps_after_cancel <= 1
    assert stats.completion_tokens < 200
    page.wait_for_selector(".msg.assistant.stopped")
    assert page.is_visible("#send")


def test_a_reload_restores_the_conversation(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "Remember me")
    wait_for_replies(page, 1)
    page.reload()
    page.wait_for_selector("#send:enabled")
    assert messages(page) == [("user", "Remember me"), ("assistant", "Remember me")]


def test_clear_empties_the_conversation_on_the_page_and_on_the_server(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "Forget me")
    wait_for_replies(page, 1)
    page.click("#clear")
    page.wait_for_selector(".msg", state="detached")
    assert server_history(page) == []
    page.reload()
    page.wait_for_selector("#send:enabled")
    assert messages(page) == []


def test_html_looking_text_is_shown_as_text_and_never_run(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    attack = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
    send(page, attack)
    wait_for_replies(page, 1)
    assert messages(page) == [("user", attack), ("assistant", attack)]
    assert page.evaluate("() => document.querySelectorAll('.bubble *').length") == 0
    assert page.evaluate("() => window.pwned") is None


def test_japanese_and_emoji_arrive_whole(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    text = "こんにちは、世界。絵文字も 👋🏽🎉👨‍👩‍👧 大丈夫"
    send(page, text)
    wait_for_replies(page, 1)
    assert messages(page)[1] == ("assistant", text)


def test_enter_sends_and_shift_enter_writes_a_new_line(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    page.click("#input")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert messages(page) == []
    page.keyboard.press("Enter")
    wait_for_replies(page, 1)
    assert messages(page)[0] == ("user", "first line\nsecond line")


def test_regenerate_replaces_the_last_reply(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "Once more")
    wait_for_replies(page, 1)
    first_id = page.get_attribute(".msg.assistant", "data-message-id")
    page.click("#regenerate")
    page.wait_for_function(
        "id => { const r = document.querySelector('.msg.assistant'); return r && r.dataset.messageId"
        " && r.dataset.messageId !== id; }",
        arg=first_id,
    )
    wait_for_replies(page, 1)
    new_id = page.get_attribute(".msg.assistant", "data-message-id")
    assert [message["id"] for message in server_history(page)] == [None, new_id]
    assert messages(page) == [("user", "Once more"), ("assistant", "Once more")]


def test_a_full_server_shows_busy_and_the_page_retries_by_itself(
    make_chat_stream: Callable[..., ChatStream], hooks: ModelHooks, serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=0, max_new_tokens=8)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True))
    page = open_page(server.url)
    stuck = threading.Event()
    hooks.hold = stuck  # the model stalls mid-step: the one slot stays taken
    other = open_chat(server.url, "I hold the only slot")
    try:
        assert hooks.prefill_started.wait(HANG_GUARD)
        send(page, "Let me in")
        page.wait_for_selector("#status:has-text('busy, retrying in')")
        hooks.hold = None
        stuck.set()
        read_first_text(other)
    finally:
        other.close()
    wait_for_replies(page, 1)
    assert messages(page)[1][1]
    assert page.is_hidden("#status")


def test_a_message_over_the_body_limit_shows_the_servers_message_and_the_chat_goes_on(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app(max_body_size=300)).url)
    send(page, "x" * 400)
    page.wait_for_selector("#status.error:has-text('limit')")
    assert "300" in (page.text_content("#status") or "")  # the server's own words, with its limit
    assert page.input_value("#input") == "x" * 400  # given back, to shorten
    assert messages(page) == []
    send(page, "short")
    wait_for_replies(page, 1)
    assert messages(page) == [("user", "short"), ("assistant", "short")]


def test_like_sends_feedback_with_the_replys_message_id(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    received: list[dict[str, Any]] = []
    page = open_page(serve(mock_app(apis={"all": True, "on_feedback_received": received.append})).url)
    send(page, "Rate me")
    wait_for_replies(page, 1)
    page.click(".msg.assistant button[aria-label='Good reply']")
    page.wait_for_selector(".msg.assistant button[aria-label='Good reply'][aria-pressed='true']")
    message_id = page.get_attribute(".msg.assistant", "data-message-id")
    assert [(feedback["target_message_id"], feedback["is_like"]) for feedback in received] == [(message_id, True)]


def test_settings_are_stored_and_a_bad_value_is_shown_next_to_its_field(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app()).url)
    page.click("#settings-toggle")
    page.wait_for_function("() => document.getElementById('temperature').value !== ''")
    page.fill("#temperature", "5")
    page.click("#settings-save")
    page.wait_for_selector("#temperature-error:has-text('temperature')")
    page.fill("#temperature", "0.3")
    page.fill("#top_k", "7")
    page.click("#settings-save")
    page.wait_for_selector("#settings-status:has-text('Saved')")
    assert page.text_content("#temperature-error") == ""
    params = page.evaluate("() => fetch('get_generation_params').then(r => r.json())")["generation_params"]
    assert (params["temperature"], params["top_k_value"]) == (0.3, 7)


def test_the_page_fits_a_phone_screen(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url, width=375, height=667)
    send(page, "A long message that has to wrap on a narrow screen " * 3)
    wait_for_replies(page, 1)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    for control in ("#input", "#send", "#clear", "#settings-toggle"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, control


def test_the_page_is_served_with_a_strict_content_security_policy(serve: Callable[[Any], LiveServer]) -> None:
    with serve(mock_app()).client() as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "'unsafe-inline'" not in response.headers["content-security-policy"]


def test_without_webui_the_apps_own_root_route_answers(serve: Callable[[Any], LiveServer]) -> None:
    chat_stream = ChatStream(engine=MockEngine())
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True)
    with serve(app).client() as client:
        assert client.get("/").status_code == 404
        assert client.get("/chatstream.js").status_code == 404


def test_get_history_returns_the_cookies_own_conversation(serve: Callable[[Any], LiveServer]) -> None:
    server = serve(mock_app())
    with server.client() as alice, server.client() as bob:
        reply = alice.post("/chat_stream", json={"user_input": "Hi"})
        message_id = reply.headers["X-ChatStream-Last-Generated-Message-Id"]
        bob.post("/chat_stream", json={"user_input": "Other"})
        assert alice.get("/get_history").json() == {
            "success": True,
            "message": "success",
            "messages": [
                {"role": "user", "content": "Hi", "id": None},
                {"role": "assistant", "content": "Hi", "id": message_id},
            ],
        }


def test_append_apis_mounts_the_page_at_the_root_with_web_ui_params(serve: Callable[[Any], LiveServer]) -> None:
    chat_stream = ChatStream(engine=MockEngine())
    app = FastAPI()
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream, serve=True)
    chat_stream.append_apis(app, {"all": True, "web_ui_params": {"title": "Support </script> bot"}})
    with serve(app).client() as client:
        page = client.get("/").text
        assert client.get("/chatstream.js").status_code == 200
        assert client.get("/get_history").json()["messages"] == []
    assert '"title": "Support \\u003c/script> bot"' in page
    assert "</script> bot" not in page


def test_append_apis_leaves_the_page_out_when_asked(serve: Callable[[Any], LiveServer]) -> None:
    chat_stream = ChatStream(engine=MockEngine())
    app = FastAPI()
    app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream)
    chat_stream.append_apis(app, {"exclude": ["webui_index"]})
    with serve(app).client() as client:
        assert client.get("/").status_code == 404
        assert client.get("/get_load").status_code == 200


def test_web_ui_params_set_the_title_placeholder_and_greeting(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    params = {"title": "Support", "placeholder": "Ask about your order", "greeting": "Hi! How can I help?"}
    page = open_page(serve(mock_app(web_ui_params=params)).url)
    assert page.title() == "Support"
    assert page.text_content("#title") == "Support"
    assert page.get_attribute("#input", "placeholder") == "Ask about your order"
    assert page.text_content("#greeting") == "Hi! How can I help?"


def test_a_waiting_page_shows_how_many_are_ahead_and_about_how_long(
    make_chat_stream: Callable[..., ChatStream], hooks: ModelHooks, serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=2, max_new_tokens=8)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True))
    page = open_page(server.url)
    stuck = threading.Event()
    hooks.hold = stuck  # the model stalls mid-step: the one slot stays taken
    running = open_chat(server.url, "I hold the only slot")
    waiting = None
    try:
        assert hooks.prefill_started.wait(HANG_GUARD)
        waiting = open_chat(server.url, "I wait first")
        assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
        send(page, "Let me in")
        page.wait_for_selector("#status.wait:has-text('1 ahead of you, about')")
        hooks.hold = None
        stuck.set()
        read_first_text(running)
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    wait_for_replies(page, 1)
    assert messages(page)[1][1]
