"""The chat page, driven in a real headless Chromium against a real server.

Chromium is Debian's (`apt-get install chromium`), launched through PyPI's playwright with
`executable_path`; `playwright install` is never needed. Without it these tests fail, never
skip: CI installs it. Each test leaves a screenshot in `$CHATSTREAM_ARTIFACTS` (default: a
temporary folder). The browser context bypasses the page's Content-Security-Policy only so
that playwright can evaluate its checks; the escaping test therefore proves that text is
inserted as text on its own, without the CSP's help.

`ScriptedEngine` lets a test write the model's reply piece by piece, so the page can be caught
before its first token or mid-reply without racing a clock. A test of how long the page waits
installs playwright's clock in the page and moves it on itself. The markdown tests
(test_webui_markdown.py) share this module's browser, page and engine helpers.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, Request, Route, sync_playwright
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine.base import GenerationFailed, GenerationStats
from chatstream_asgi.engine.mock import MockEngine
from chatstream_asgi.sessions.signing import CookieSigner

from .conftest import HANG_GUARD, LiveServer, ModelHooks, Outcomes, open_chat, read_first_text, wait_until
from .faultproxy import FaultProxy

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

    def open_(
        url: str, width: int = 1000, height: int = 720, init_script: str | None = None, clock: bool = False
    ) -> Page:
        context = browser.new_context(bypass_csp=True, viewport={"width": width, "height": height})
        if init_script is not None:
            context.add_init_script(init_script)
        page = context.new_page()
        if clock:  # the page's timers wait for page.clock to move on
            page.clock.install()
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


class _ScriptedGeneration:
    def __init__(self, send: Any, receive: Any) -> None:
        self.stats = GenerationStats()
        self._send = send
        self._receive = receive

    async def next_text(self, timeout: float) -> str | None:
        with anyio.move_on_after(timeout):
            try:
                piece = await self._receive.receive()
            except anyio.EndOfStream:  # cancel() closed the stream
                self.stats.finish_reason = "cancelled"
                return None
            if piece is None:
                self.stats.finish_reason = "stop"
                return None
            self.stats.completion_tokens += 1
            return str(piece)
        return ""

    def cancel(self) -> None:
        self._send.close()


class ScriptedEngine:
    """An engine whose reply the test writes: `say(text)` sends a piece, `end()` ends the reply."""

    ready = True
    name_or_path = "scripted"

    def __init__(self) -> None:
        self.started = threading.Event()
        self._token: Any = None
        self._send: Any = None

    @asynccontextmanager
    async def generate(self, prompt: Any, params: Any, *, context_len: int) -> AsyncIterator[_ScriptedGeneration]:
        send, receive = anyio.create_memory_object_stream[str | None](64)
        with send, receive:
            # The test speaks from its own thread: into this loop, through its token.
            self._token, self._send = anyio.lowlevel.current_token(), send
            self.started.set()
            yield _ScriptedGeneration(send, receive)

    def say(self, text: str | None) -> None:
        assert self.started.wait(HANG_GUARD), "no generation started"
        anyio.from_thread.run_sync(self._send.send_nowait, text, token=self._token)

    def end(self) -> None:
        self.say(None)

    def close(self) -> None:
        """Nothing to release."""


def mock_app(**options: Any) -> ChatStreamMiddleware:
    """The page in front of the mock engine, which echoes what it is told."""
    return engine_app(MockEngine(tokens_per_second=200), **options)


def engine_app(engine: Any, *, allow_system_prompt: bool = False, **middleware: Any) -> ChatStreamMiddleware:
    """The page in front of `engine` (a MockEngine that says a text, a ScriptedEngine), on a
    ChatStream with `allow_system_prompt` (off by default, as for any app)."""
    chat_stream = ChatStream(engine=engine, max_new_tokens=1024, allow_system_prompt=allow_system_prompt)
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


def contents(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in history]


def chat_bodies(page: Page) -> list[dict[str, Any]]:
    """The bodies of the chats the page sends from now on, as they are sent."""
    bodies: list[dict[str, Any]] = []

    def record(request: Request) -> None:
        if "chat_stream" in request.url:
            bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", record)
    return bodies


def is_chat(url: str) -> bool:
    return urlparse(url).path.endswith("/chat_stream")


def edit_last_message(page: Page, text: str) -> None:
    page.click(".msg.user.editable button[aria-label='Edit message']")
    page.fill(".msg.user.editing textarea", text)
    page.click(".msg.user.editing button[type='submit']")


def session_cookie(page: Page) -> str:
    return next(cookie["value"] for cookie in page.context.cookies() if cookie["name"] == "chatstream_session")


def save_system_prompt(page: Page, text: str) -> None:
    if page.is_hidden("#settings"):
        page.click("#settings-toggle")
    page.fill("#system", text)
    page.click("#settings-save")
    page.wait_for_selector("#settings-status:has-text('Saved')")
    page.evaluate("() => { document.getElementById('settings-status').textContent = ''; }")


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
    page.click("#confirm-ok")
    page.wait_for_selector(".msg", state="detached")
    assert server_history(page) == []
    page.reload()
    page.wait_for_selector("#send:enabled")
    assert messages(page) == []


def test_clear_asks_first_and_cancel_keeps_the_conversation(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "Keep me")
    wait_for_replies(page, 1)
    page.click("#clear")
    page.wait_for_selector("#confirm[open]")
    page.click("#confirm-cancel")
    page.wait_for_selector("#confirm", state="hidden")
    assert messages(page) == [("user", "Keep me"), ("assistant", "Keep me")]
    assert contents(server_history(page)) == [("user", "Keep me"), ("assistant", "Keep me")]


def test_new_chat_empties_the_page_without_asking_and_keeps_the_old_conversation_on_the_server(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    server = serve(mock_app())
    page = open_page(server.url)
    send(page, "First conversation")
    wait_for_replies(page, 1)
    old_cookie = session_cookie(page)
    page.click("#new-chat")
    page.wait_for_selector(".msg", state="detached")
    assert page.evaluate("() => document.getElementById('confirm').open") is False
    assert session_cookie(page) != old_cookie
    assert server_history(page) == []
    with server.client(cookies={"chatstream_session": old_cookie}) as old:
        kept = old.get("/get_history").json()["messages"]
    assert contents(kept) == [("user", "First conversation"), ("assistant", "First conversation")]


def test_html_looking_text_is_shown_as_text_and_never_run(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    attack = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
    send(page, attack)
    wait_for_replies(page, 1)
    assert messages(page) == [("user", attack), ("assistant", attack)]
    assert page.evaluate("() => document.querySelectorAll('.msg.user .bubble *').length") == 0
    assert page.evaluate("() => document.querySelectorAll('.bubble img, .bubble script, .bubble b').length") == 0
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
    # Given back, to shorten, once the page has shown the history the server kept.
    page.wait_for_function("() => document.querySelector('#input').value === 'x'.repeat(400)")
    assert messages(page) == []
    send(page, "short")
    wait_for_replies(page, 1)
    assert messages(page) == [("user", "short"), ("assistant", "short")]


def test_the_last_user_message_can_be_edited_and_resent(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "First question")
    wait_for_replies(page, 1)
    send(page, "Secnod qestion")
    wait_for_replies(page, 2)
    bodies = chat_bodies(page)
    edit_last_message(page, "Second question")
    wait_for_replies(page, 2)
    assert bodies == [{"edit": "Second question"}]
    expected = [
        ("user", "First question"),
        ("assistant", "First question"),
        ("user", "Second question"),
        ("assistant", "Second question"),
    ]
    assert messages(page) == expected
    assert contents(server_history(page)) == expected


def refuse(route: Route) -> None:
    route.fulfill(status=503, json={"success": False, "error": "queue_timeout", "detail": "No slot came free."})


def drop(route: Route) -> None:
    route.abort()


@pytest.mark.parametrize("failure", [refuse, drop], ids=["refused", "unreachable"])
def test_an_edit_that_fails_is_given_back_in_the_editor(
    failure: Callable[[Route], None], serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "Secnod qestion")
    wait_for_replies(page, 1)
    page.route(is_chat, failure)
    edit_last_message(page, "Second question")
    page.wait_for_selector("#status.error")
    page.wait_for_function(
        "() => !document.getElementById('send').hidden && document.querySelector('.msg.user.editing textarea')"
    )
    assert page.input_value(".msg.user.editing textarea") == "Second question"
    assert messages(page) == [("user", "Secnod qestion"), ("assistant", "Secnod qestion")]  # as the server keeps it
    page.unroute(is_chat)
    page.click(".msg.user.editing button[type='submit']")  # and it can be sent again as it is
    wait_for_replies(page, 1)
    assert contents(server_history(page)) == [("user", "Second question"), ("assistant", "Second question")]


def test_only_the_last_user_message_offers_an_edit(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "One")
    wait_for_replies(page, 1)
    send(page, "Two")
    wait_for_replies(page, 2)
    edits = page.locator(".msg.user button[aria-label='Edit message']:visible")
    assert edits.count() == 1
    assert edits.evaluate("button => button.closest('.msg').querySelector('.bubble').textContent") == "Two"


def test_cancelling_an_edit_keeps_the_message_as_it_was(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    send(page, "As it was")
    wait_for_replies(page, 1)
    page.click(".msg.user.editable button[aria-label='Edit message']")
    page.fill(".msg.user.editing textarea", "Something else")
    page.click(".msg.user.editing button:has-text('Cancel')")
    page.wait_for_selector(".msg.user.editing", state="detached")
    assert messages(page) == [("user", "As it was"), ("assistant", "As it was")]
    assert contents(server_history(page)) == [("user", "As it was"), ("assistant", "As it was")]


def test_a_typing_indicator_shows_until_the_first_text_arrives(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    engine = ScriptedEngine()
    page = open_page(serve(engine_app(engine)).url)
    send(page, "Are you there?")
    assert engine.started.wait(HANG_GUARD)  # the model is thinking: no token yet
    assert page.locator(".msg.assistant .typing").is_visible()
    engine.say("Yes")
    page.wait_for_selector(".msg.assistant .typing", state="detached")
    assert messages(page)[1] == ("assistant", "Yes")
    engine.end()
    wait_for_replies(page, 1)


def test_the_typing_indicator_goes_when_the_turn_ends_without_text(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    engine = ScriptedEngine()
    page = open_page(serve(engine_app(engine)).url)
    send(page, "Never mind")
    assert engine.started.wait(HANG_GUARD)
    page.wait_for_selector(".msg.assistant .typing")
    page.click("#stop")
    page.wait_for_selector("#status:has-text('Stopped before the reply began')")
    assert page.locator(".typing").count() == 0


def test_like_and_dislike_appear_only_once_the_reply_has_finished(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    engine = ScriptedEngine()
    page = open_page(serve(engine_app(engine)).url)
    send(page, "Rate me later")
    engine.say("Still writing")
    page.wait_for_function("() => document.querySelector('.msg.assistant .bubble').textContent === 'Still writing'")
    buttons = ".msg.assistant button[aria-label='Good reply'], .msg.assistant button[aria-label='Bad reply']"
    assert page.locator(buttons).count() == 0
    engine.end()
    wait_for_replies(page, 1)
    assert page.locator(buttons).count() == 2


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


def test_a_system_prompt_set_in_the_settings_reaches_the_server(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app(allow_system_prompt=True, apis={"all": True})).url)
    save_system_prompt(page, "Answer like a pirate.")
    send(page, "Hello")
    wait_for_replies(page, 1)
    prompt = unquote(page.evaluate("() => fetch('get_prompt').then(r => r.json())")["prompt"])
    assert "Answer like a pirate." in prompt  # ChatStream's get_prompt is URL-encoded


def test_the_system_prompt_is_kept_in_the_browser_and_sent_with_every_chat(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app(allow_system_prompt=True)).url)
    save_system_prompt(page, "Be brief.")
    page.reload()
    page.wait_for_selector("#send:enabled")
    bodies = chat_bodies(page)
    send(page, "One")
    wait_for_replies(page, 1)
    send(page, "Two")
    wait_for_replies(page, 2)
    assert [body.get("system") for body in bodies] == ["Be brief.", "Be brief."]
    page.click("#settings-toggle")
    assert page.input_value("#system") == "Be brief."


def test_an_emptied_system_prompt_is_sent_as_empty(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app(allow_system_prompt=True)).url)
    save_system_prompt(page, "Be brief.")
    save_system_prompt(page, "")
    bodies = chat_bodies(page)
    send(page, "Plain again")
    wait_for_replies(page, 1)
    assert [body.get("system") for body in bodies] == [""]


def test_no_system_is_sent_until_the_user_sets_one(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app(allow_system_prompt=True)).url)
    page.click("#settings-toggle")
    page.click("#settings-save")  # saving the other settings leaves an untouched system prompt unset
    page.wait_for_selector("#settings-status:has-text('Saved')")
    bodies = chat_bodies(page)
    send(page, "Hello")
    wait_for_replies(page, 1)
    assert ["system" in body for body in bodies] == [False]


def test_an_edit_carries_the_system_prompt_where_the_server_takes_one(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app(allow_system_prompt=True)).url)
    save_system_prompt(page, "Be brief.")
    bodies = chat_bodies(page)
    send(page, "Hello")
    wait_for_replies(page, 1)
    edit_last_message(page, "Hello again")
    wait_for_replies(page, 1)
    assert bodies == [
        {"user_input": "Hello", "regenerate": False, "system": "Be brief."},
        {"edit": "Hello again", "system": "Be brief."},
    ]
    assert contents(server_history(page)) == [("user", "Hello again"), ("assistant", "Hello again")]


def test_where_the_server_takes_no_system_prompt_the_page_neither_offers_nor_sends_one(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    # Not even one this browser kept from a server that took one: this server would refuse it.
    kept = "localStorage.setItem('chatstream-asgi.system:/', 'Be brief.');"
    page = open_page(serve(mock_app()).url, init_script=kept)
    page.click("#settings-toggle")
    page.wait_for_function("() => document.getElementById('temperature').value !== ''")
    assert page.is_hidden("#system")
    page.click("#settings-save")
    page.wait_for_selector("#settings-status:has-text('Saved')")
    bodies = chat_bodies(page)
    send(page, "Hello")
    wait_for_replies(page, 1)
    edit_last_message(page, "Hello again")
    wait_for_replies(page, 1)
    assert bodies == [{"user_input": "Hello", "regenerate": False}, {"edit": "Hello again"}]
    assert messages(page) == [("user", "Hello again"), ("assistant", "Hello again")]


def test_the_page_fits_a_phone_screen(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url, width=375, height=667)
    send(page, "A long message that has to wrap on a narrow screen " * 3)
    wait_for_replies(page, 1)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    for control in ("#input", "#send", "#new-chat", "#clear", "#settings-toggle"):
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


def test_the_default_title_is_chatstream_asgi(serve: Callable[[Any], LiveServer], open_page: Any) -> None:
    page = open_page(serve(mock_app()).url)
    assert page.title() == "chatstream-asgi"
    assert page.text_content("#title") == "chatstream-asgi"


def test_web_ui_params_set_the_title_placeholder_and_greeting(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    params = {"title": "Support", "placeholder": "Ask about your order", "greeting": "Hi! How can I help?"}
    page = open_page(serve(mock_app(web_ui_params=params)).url)
    assert page.title() == "Support"
    assert page.text_content("#title") == "Support"
    assert page.get_attribute("#input", "placeholder") == "Ask about your order"
    assert page.text_content("#greeting") == "Hi! How can I help?"


def wait_in_the_queue(server: LiveServer, chat_stream: ChatStream, hooks: ModelHooks, page: Page, status: str) -> str:
    """Send from the page while one chat holds the only slot and another waits before it; the
    status line once it says `status`."""
    stuck = threading.Event()
    hooks.hold = stuck  # the model stalls mid-step: the one slot stays taken
    running = open_chat(server.url, "I hold the only slot")
    waiting = None
    try:
        assert hooks.prefill_started.wait(HANG_GUARD)
        waiting = open_chat(server.url, "I wait first")
        assert wait_until(lambda: chat_stream.load()["waiting"] == 1)
        send(page, "Let me in")
        page.wait_for_selector(f"#status.wait:has-text('{status}')")
        shown = page.text_content("#status") or ""
        hooks.hold = None
        stuck.set()
        read_first_text(running)
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    wait_for_replies(page, 1)
    assert messages(page)[1][1]
    return shown


def test_a_waiting_page_shows_its_place_without_a_made_up_estimate(
    make_chat_stream: Callable[..., ChatStream], hooks: ModelHooks, serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=2, max_new_tokens=8)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True))
    page = open_page(server.url)
    # No generation has finished yet, so the server's eta_s is null: no time to show.
    assert wait_in_the_queue(server, chat_stream, hooks, page, "1 ahead of you") == "1 ahead of you"


def test_a_waiting_page_shows_about_how_long_once_the_server_has_timed_a_reply(
    make_chat_stream: Callable[..., ChatStream], hooks: ModelHooks, serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    chat_stream = make_chat_stream(num_of_concurrent_executions=1, max_queue_size=2, max_new_tokens=8)
    server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True))
    with server.client() as client:
        assert client.post("/chat_stream", json={"user_input": "A reply to time"}).status_code == 200
    page = open_page(server.url)
    assert wait_in_the_queue(server, chat_stream, hooks, page, "1 ahead of you, about ").endswith(" s")


# -- a conversation held by another turn, and replies cut off --------------------------------

SECRET_KEY = "the webui tests' cookie key"  # so that a test can read the session id in the page's cookie
BUSY_NOTE = ".msg.assistant.pending .reply-note.wait:has-text('Waiting for the previous reply to finish')"


def hold_turn(app: ChatStreamMiddleware, page: Page) -> Callable[[], None]:
    """Take the turn lock of the page's conversation in the server's store, as a replica that
    died mid-turn leaves it until it expires: meanwhile every turn of it gets 409 session_busy
    with Retry-After. Returns what frees it."""
    session_id = CookieSigner(SECRET_KEY).unsign(session_cookie(page))
    assert session_id is not None
    store = app.session_store
    token = _run_aside(store.lock_turn, session_id)
    assert token is not None
    return lambda: _run_aside(store.unlock_turn, session_id, token)


def _run_aside(function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run an async function of the memory store (a dict with a checkpoint) on a loop of its own,
    in a thread of its own: this one runs playwright's."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, function, *args).result(HANG_GUARD)


def chat_answers(page: Page) -> list[int]:
    """The statuses of the chats the page is answered from now on."""
    statuses: list[int] = []
    page.on("response", lambda response: statuses.append(response.status) if is_chat(response.url) else None)
    return statuses


def wait_for_events(page: Page, condition: Callable[[], bool]) -> bool:
    """`wait_until` for a condition on what playwright's events record: they come in only while
    a call into playwright runs."""
    return wait_until(lambda: page.evaluate("true") and condition())


def requests_after(page: Page, urls: list[str]) -> list[str]:
    """`urls` once a request the test makes now has been seen: every request the page made before
    it is in by then."""
    server_history(page)
    assert urls[-1] == "/get_history"
    return urls[:-1]


def send_again(page: Page) -> None:
    send(page, "Hello again")


def regenerate(page: Page) -> None:
    page.click("#regenerate")


def edit(page: Page) -> None:
    edit_last_message(page, "Hello again")


@pytest.mark.parametrize(
    ("act", "expected"),
    [
        (send_again, ["Hello", "Hello", "Hello again", "Hello again"]),
        (regenerate, ["Hello", "Hello"]),
        (edit, ["Hello again", "Hello again"]),
    ],
    ids=["send", "regenerate", "edit"],
)
def test_a_turn_refused_as_busy_waits_quietly_and_goes_through_once_the_conversation_is_free(
    act: Callable[[Page], None], expected: list[str], serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    app = mock_app(secret_key=SECRET_KEY)
    page = open_page(serve(app).url)
    send(page, "Hello")
    wait_for_replies(page, 1)
    bodies = chat_bodies(page)
    answers = chat_answers(page)
    release = hold_turn(app, page)
    act(page)
    page.wait_for_selector(BUSY_NOTE)
    assert wait_for_events(page, lambda: len(answers) >= 2)  # refused, waited Retry-After, refused again
    assert page.is_hidden("#status")  # waiting is no error
    release()
    wait_for_replies(page, len(expected) // 2)
    conversation = [("user" if index % 2 == 0 else "assistant", text) for index, text in enumerate(expected)]
    assert messages(page) == conversation
    assert contents(server_history(page)) == conversation
    assert answers[0] == 409 and answers[-1] == 200
    assert all(body == bodies[0] for body in bodies)  # the same turn, tried again
    assert page.is_hidden("#status")
    assert page.locator(".reply-note").count() == 0


def test_clear_waits_for_a_busy_conversation_and_then_clears_it(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    app = mock_app(secret_key=SECRET_KEY)
    page = open_page(serve(app).url)
    send(page, "Forget me")
    wait_for_replies(page, 1)
    release = hold_turn(app, page)
    page.click("#clear")
    page.click("#confirm-ok")
    page.wait_for_selector("#status.wait:has-text('Waiting for the previous reply to finish')")
    assert messages(page) == [("user", "Forget me"), ("assistant", "Forget me")]
    release()
    page.wait_for_selector(".msg", state="detached")
    assert page.is_hidden("#status")
    assert server_history(page) == []


def test_stop_while_clear_waits_for_a_busy_conversation_keeps_the_conversation(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    app = mock_app(secret_key=SECRET_KEY)
    page = open_page(serve(app).url, clock=True)
    send(page, "Keep me")
    wait_for_replies(page, 1)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(urlparse(request.url).path))
    release = hold_turn(app, page)
    page.click("#clear")
    page.click("#confirm-ok")
    page.wait_for_selector("#status.wait:has-text('Waiting for the previous reply to finish')")
    page.click("#stop")
    page.wait_for_selector("#status:has-text('Stopped while waiting')")
    page.clock.run_for(60_000)  # long past any retry it had planned
    release()
    assert requests_after(page, urls) == ["/clear_context"]
    kept = [("user", "Keep me"), ("assistant", "Keep me")]
    assert messages(page) == kept
    assert contents(server_history(page)) == kept
    assert page.is_visible("#send")


def test_stop_while_the_page_waits_for_a_busy_conversation_ends_the_wait_and_tries_no_more(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    app = mock_app(secret_key=SECRET_KEY)
    page = open_page(serve(app).url, clock=True)
    send(page, "Hello")
    wait_for_replies(page, 1)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(urlparse(request.url).path))
    release = hold_turn(app, page)
    send(page, "Are you free?")
    page.wait_for_selector(BUSY_NOTE)
    page.click("#stop")
    page.wait_for_selector("#status:has-text('Stopped before the reply began')")
    page.clock.run_for(60_000)  # long past any retry it had planned
    release()
    assert requests_after(page, urls) == ["/chat_stream", "/get_history"]  # one try, then the history
    assert messages(page) == [("user", "Hello"), ("assistant", "Hello")]
    assert page.input_value("#input") == "Are you free?"  # given back, to send once free


def test_a_conversation_still_busy_after_the_pages_bound_shows_the_servers_error(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    app = mock_app(secret_key=SECRET_KEY)
    page = open_page(serve(app).url, clock=True)
    send(page, "Hello")
    wait_for_replies(page, 1)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(urlparse(request.url).path))
    answers = chat_answers(page)
    release = hold_turn(app, page)

    def gave_up() -> bool:
        if page.locator("#status.error").count():
            return True
        if len(answers) == urls.count("/chat_stream"):  # no chat in flight: the page is waiting
            page.clock.run_for(1000)
        return False

    try:
        send(page, "Are you free?")
        page.wait_for_selector(BUSY_NOTE)
        assert wait_until(gave_up)
        page.clock.run_for(60_000)  # and it tries no more
        tried = requests_after(page, urls).count("/chat_stream")
    finally:
        release()
    assert "still running" in (page.text_content("#status") or "")  # the server's own words
    assert 3 < tried <= 31 and set(answers) == {409}  # Retry-After: 1, for 30 s
    assert messages(page) == [("user", "Hello"), ("assistant", "Hello")]
    assert page.input_value("#input") == "Are you free?"


def test_a_reply_whose_connection_breaks_stays_as_far_as_it_came_marked_cut_off(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    engine = ScriptedEngine()
    server = serve(engine_app(engine))
    with FaultProxy(int(server.url.rsplit(":", 1)[1])) as proxy:
        page = open_page(f"http://127.0.0.1:{proxy.port}")
        send(page, "Tell me everything")
        engine.say("The first half")
        page.wait_for_function(
            "() => document.querySelector('.msg.assistant .bubble').textContent === 'The first half'"
        )
    # Leaving the proxy broke every connection through it, mid-reply: what a server that dies does.
    page.wait_for_selector(".msg.assistant.cut:not(.pending)")
    assert messages(page) == [("user", "Tell me everything"), ("assistant", "The first half")]
    assert "cut off" in (page.text_content(".msg.assistant .reply-note.cut") or "")
    assert page.locator(".msg.assistant button[aria-label='Good reply']").count() == 0  # not a finished reply
    assert page.is_visible("#send")
    assert page.input_value("#input") == "Tell me everything"  # to send again


def test_a_reply_that_ends_without_done_is_cut_off_and_regenerate_replaces_what_the_server_kept(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(mock_app()).url)
    bodies = chat_bodies(page)

    def drop_done(route: Route) -> None:  # a proxy that ends the reply early, cleanly
        response = route.fetch()
        body = response.text()
        route.fulfill(response=response, body=body[: body.index("event: done")])

    page.route(is_chat, drop_done, times=1)
    send(page, "Say it twice")
    page.wait_for_selector(".msg.assistant.cut .reply-note.cut:has-text('cut off')")
    assert messages(page) == [("user", "Say it twice"), ("assistant", "Say it twice")]
    # The server went on to the end and kept the turn: Regenerate replaces its reply.
    page.click("#regenerate")
    wait_for_replies(page, 1)
    assert bodies == [{"user_input": "Say it twice", "regenerate": False}, {"user_input": "", "regenerate": True}]
    history = server_history(page)
    assert contents(history) == [("user", "Say it twice"), ("assistant", "Say it twice")]
    assert history[1]["id"] == page.get_attribute(".msg.assistant", "data-message-id")
    assert page.locator(".msg.cut, .reply-note").count() == 0
    assert page.input_value("#input") == ""


class _BrokenGeneration:
    """Says `text`, then fails as an engine that crashes mid-reply does."""

    def __init__(self, text: str) -> None:
        self.stats = GenerationStats()
        self._text = text

    async def next_text(self, timeout: float) -> str | None:
        await anyio.lowlevel.checkpoint()
        text, self._text = self._text, ""
        if not text:
            raise GenerationFailed("the model ran out of memory")
        self.stats.completion_tokens += 1
        return text

    def cancel(self) -> None:
        """It ends by itself."""


class BreaksOffEngine(MockEngine):
    """Echoes as MockEngine does, but its `nth` reply breaks off after `text`."""

    def __init__(self, nth: int, text: str) -> None:
        super().__init__(tokens_per_second=200)
        self._left = nth
        self._text = text

    @asynccontextmanager
    async def generate(self, prompt: Any, params: Any, *, context_len: int) -> AsyncIterator[Any]:
        self._left -= 1
        if self._left == 0:
            yield _BrokenGeneration(self._text)
            return
        async with super().generate(prompt, params, context_len=context_len) as generation:
            yield generation


def test_an_error_mid_reply_is_shown_and_regenerate_sends_the_turn_the_server_dropped_again(
    serve: Callable[[Any], LiveServer], open_page: Any
) -> None:
    page = open_page(serve(engine_app(BreaksOffEngine(2, "Half a"))).url)
    send(page, "First")
    wait_for_replies(page, 1)
    bodies = chat_bodies(page)
    send(page, "Second")
    page.wait_for_selector(".msg.assistant.cut:not(.pending)")
    assert "the model ran out of memory" in (page.text_content("#status.error") or "")
    assert messages(page)[-1] == ("assistant", "Half a")
    # The server kept nothing of the failed turn: Regenerate sends its message again (a
    # regenerate would replace the reply to "First").
    page.click("#regenerate")
    wait_for_replies(page, 2)
    expected = [("user", "First"), ("assistant", "First"), ("user", "Second"), ("assistant", "Second")]
    assert messages(page) == expected
    assert contents(server_history(page)) == expected
    assert bodies == [{"user_input": "Second", "regenerate": False}] * 2
    assert page.input_value("#input") == ""
    assert page.is_hidden("#status")
