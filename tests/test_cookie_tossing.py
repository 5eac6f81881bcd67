"""Cookie tossing: another origin of the site sets a session cookie of its own beside the visitor's.

A page on a sibling subdomain (here `evil.example.test`, beside the chat at `chat.example.test`;
Chromium maps both to 127.0.0.1 with `--host-resolver-rules`) can set a cookie for the whole
site. The attacker's cookie is a validly signed one the server gave the attacker itself. Before
the fix the server kept the last cookie of the name, the attacker's, so the visitor's next
message landed in the attacker's conversation. Now a request naming the session twice gets a
fresh session, and with `https_only` the cookie is named `__Host-...`, which no sibling can set.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, sync_playwright
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware

from .conftest import HANG_GUARD, LiveServer, wait_until
from .test_webui import CHROMIUM

COOKIE = "chatstream_session"
SECRET = "my locker code is 4417"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian), or set CHATSTREAM_CHROMIUM")
    with sync_playwright() as playwright:
        # Two hosts of one site, both this machine: the chat and the attacker's sibling subdomain.
        args = ["--host-resolver-rules=MAP *.example.test 127.0.0.1"]
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield chromium
        chromium.close()


def _chat_server(make_chat_stream: Any, serve: Any, **options: Any) -> LiveServer:
    chat_stream = make_chat_stream(max_new_tokens=4)
    server: LiveServer = serve(
        ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True, **options)
    )
    return server


def _history(url: str, cookie: str, name: str = COOKIE) -> str:
    """The text of the conversation `cookie` names (its user messages and replies)."""
    # (verify=False: the https_only server's certificate is one the test made)
    response = httpx.get(f"{url}/get_history", headers={"Cookie": f"{name}={cookie}"}, verify=False, timeout=HANG_GUARD)
    assert response.status_code == 200
    return " ".join(message["content"] for message in response.json()["messages"])


def _attackers_cookie(url: str) -> str:
    """A session cookie the server itself signed, which the attacker got by chatting once."""
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as attacker:
        assert attacker.post("/chat_stream", json={"user_input": "attacker was here"}).status_code == 200
        return attacker.cookies[COOKIE]


def test_a_cookie_tossed_by_a_sibling_subdomain_does_not_take_over_the_visitors_conversation(
    browser: Browser, make_chat_stream: Any, serve: Any
) -> None:
    server = _chat_server(make_chat_stream, serve)
    port = server.url.rsplit(":", 1)[1]
    chat_url = f"http://chat.example.test:{port}"
    tossed = _attackers_cookie(server.url)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(HANG_GUARD * 1000)
        page.goto(chat_url + "/")
        send = """async (text) => {const response = await fetch("/chat_stream", {method: "POST",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify({user_input: text})});
            await response.text(); return response.status}"""  # the whole reply: the turn is stored
        assert page.evaluate(send, "hello, my first message") == 200
        visitors = next(cookie["value"] for cookie in context.cookies() if cookie["name"] == COOKIE)

        # The visitor opens a page of the sibling subdomain, which sets its cookie for the whole site.
        evil = "http://evil.example.test/"
        toss = f'<script>document.cookie = "{COOKIE}={tossed}; domain=example.test; path=/"</script>'
        context.route(evil, lambda route: route.fulfill(content_type="text/html", body=toss))
        context.new_page().goto(evil)
        domains = sorted(cookie["domain"] for cookie in context.cookies() if cookie["name"] == COOKIE)
        assert domains == [".example.test", "chat.example.test"]  # the browser now sends both

        assert page.evaluate(send, SECRET) == 200
        fresh = next(
            cookie["value"]
            for cookie in context.cookies()
            if cookie["name"] == COOKIE and cookie["domain"] == "chat.example.test"
        )
    finally:
        context.close()
    assert SECRET not in _history(server.url, tossed)  # the attacker reads nothing of the visitor's
    assert SECRET not in _history(server.url, visitors)  # neither cookie was trusted...
    assert fresh != visitors and SECRET in _history(server.url, fresh)  # ...the message went to a new session


@pytest.mark.parametrize("order", ["visitor-first", "attacker-first", "two-header-lines"])
def test_a_cookie_header_naming_the_session_twice_starts_a_fresh_session_and_warns(
    order: str, make_chat_stream: Any, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = _chat_server(make_chat_stream, serve)
    attackers = _attackers_cookie(server.url)
    with httpx.Client(base_url=server.url, timeout=HANG_GUARD) as visitor:
        assert visitor.post("/chat_stream", json={"user_input": "hello"}).status_code == 200
        visitors = visitor.cookies[COOKIE]
    first, second = (visitors, attackers) if order != "attacker-first" else (attackers, visitors)
    if order == "two-header-lines":
        cookies = [("Cookie", f"{COOKIE}={first}"), ("Cookie", f"{COOKIE}={second}")]
    else:
        cookies = [("Cookie", f"{COOKIE}={first}; {COOKIE}={second}")]
    with caplog.at_level(logging.WARNING, logger="chatstream_asgi"):
        response = httpx.post(
            f"{server.url}/chat_stream",
            headers=[("Content-Type", "application/json"), *cookies],
            content=f'{{"user_input": "{SECRET}"}}',
            timeout=HANG_GUARD,
        )
    assert response.status_code == 200
    fresh = response.cookies[COOKIE]  # a new session, with its own cookie
    assert fresh not in (visitors, attackers)
    assert SECRET not in _history(server.url, attackers) and SECRET not in _history(server.url, visitors)
    assert SECRET in _history(server.url, fresh)
    assert any(f"names {COOKIE} 2 times" in record.getMessage() for record in caplog.records)


def test_https_only_names_the_cookie_host_prefixed_and_ignores_the_plain_name(
    make_chat_stream: Any, serve: Any
) -> None:
    server = _chat_server(make_chat_stream, serve, https_only=True)
    attackers = _attackers_cookie_named(server.url, f"__Host-{COOKIE}")
    first = httpx.post(f"{server.url}/chat_stream", json={"user_input": "hello"}, timeout=HANG_GUARD)
    set_cookie = first.headers["set-cookie"]
    name, _, rest = set_cookie.partition("=")
    attributes = [part.strip().lower() for part in rest.split(";")[1:]]
    # What a browser needs to keep a __Host- cookie: Secure, Path=/, and no Domain.
    assert name == f"__Host-{COOKIE}" and "secure" in attributes and "path=/" in attributes
    assert not any(attribute.startswith("domain") for attribute in attributes)
    visitors = first.cookies[name]
    # A sibling's cookie of the plain name is not the session's: it is ignored, whatever it holds.
    cookie = f"{name}={visitors}; {COOKIE}={attackers}"
    headers = {"Cookie": cookie, "Content-Type": "application/json"}
    second = httpx.post(
        f"{server.url}/chat_stream", headers=headers, content=f'{{"user_input": "{SECRET}"}}', timeout=HANG_GUARD
    )
    assert second.status_code == 200 and "set-cookie" not in second.headers  # the same session went on
    assert SECRET in _history(server.url, visitors, name)


def _attackers_cookie_named(url: str, name: str) -> str:
    """A validly signed cookie value, given under `name` by the server to the attacker."""
    response = httpx.post(f"{url}/chat_stream", json={"user_input": "attacker was here"}, timeout=HANG_GUARD)
    return response.cookies[name]


def test_the_session_cookie_option_is_prefixed_with_https_only_unless_it_has_a_prefix(make_chat_stream: Any) -> None:
    chat_stream = make_chat_stream(max_new_tokens=4)

    def name(**options: Any) -> str:
        cookie: str = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, **options).session_cookie
        return cookie

    assert name() == COOKIE
    assert name(https_only=True) == f"__Host-{COOKIE}"
    assert name(session_cookie="mine", https_only=True) == "__Host-mine"
    assert name(session_cookie="__Secure-mine", https_only=True) == "__Secure-mine"
    assert name(session_cookie="__Host-mine", https_only=True) == "__Host-mine"
    with pytest.raises(ValueError, match="needs https_only=True"):
        name(session_cookie="__Host-mine")


@pytest.fixture
def https_server(tmp_path: Path, make_chat_stream: Any) -> Iterator[str]:
    """The chat with `https_only=True` over TLS (a certificate made here for *.example.test)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=chat.example.test",
         "-addext", "subjectAltName=DNS:chat.example.test,DNS:*.example.test,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    app = ChatStreamMiddleware(
        Starlette(), chat_stream=make_chat_stream(max_new_tokens=4), serve=True, webui=True, https_only=True
    )
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", ssl_keyfile=str(key), ssl_certfile=str(cert)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started)
    yield f"https://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(HANG_GUARD)


def test_with_https_only_a_sibling_subdomain_cannot_toss_the_host_prefixed_cookie(
    browser: Browser, https_server: str
) -> None:
    name = f"__Host-{COOKIE}"
    with httpx.Client(base_url=https_server, verify=False, timeout=HANG_GUARD) as attacker:
        assert attacker.post("/chat_stream", json={"user_input": "attacker was here"}).status_code == 200
        tossed = attacker.cookies[name]
    chat_url = "https://chat.example.test:" + https_server.rsplit(":", 1)[1]
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.set_default_timeout(HANG_GUARD * 1000)
        page.goto(chat_url + "/")
        send = """async (text) => {const response = await fetch("/chat_stream", {method: "POST",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify({user_input: text})});
            await response.text(); return response.status}"""
        assert page.evaluate(send, "hello, my first message") == 200
        visitors = next(cookie["value"] for cookie in context.cookies() if cookie["name"] == name)

        evil = "https://evil.example.test/"
        toss = (
            f'<script>document.cookie = "{name}={tossed}; domain=example.test; path=/; secure";'
            f'document.cookie = "{COOKIE}={tossed}; domain=example.test; path=/; secure"</script>'
        )
        context.route(evil, lambda route: route.fulfill(content_type="text/html", body=toss))
        context.new_page().goto(evil)
        named = sorted((cookie["name"], cookie["domain"]) for cookie in context.cookies())
        # The browser refused the __Host- cookie with a Domain; the plain name it took means nothing here.
        assert named == [(name, "chat.example.test"), (COOKIE, ".example.test")]
        assert page.evaluate(send, SECRET) == 200
    finally:
        context.close()
    assert SECRET not in _history(https_server, tossed, name)
    assert SECRET in _history(https_server, visitors, name)  # the visitor's own conversation went on
