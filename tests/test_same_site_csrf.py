"""Same-site CSRF: a page on another origin of the same site posts with the visitor's cookie.

`SameSite=Lax` keeps the cookie off cross-*site* POSTs only: a page on another port of
127.0.0.1 is the same site, so its `no-cors` fetches and its form POSTs carry the visitor's
session cookie. Before the fix they cleared the visitor's conversation, set `max_new_tokens` to
1 and planted a message in it. Now a cookie-carrying POST that changes a conversation must come
from the server's own origin (or `allowed_origins`) and say `Content-Type: application/json`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from chatstream_asgi import ChatStream, ChatStreamMiddleware

from . import test_webui
from .conftest import HANG_GUARD, LiveServer, wait_until

browser = test_webui.browser  # the page tests' Chromium, a fixture
COOKIE = "chatstream_session"
JSON = {"Content-Type": "application/json"}
#: A POST of each route that changes the cookie's conversation, with a body it takes.
CHANGES = {
    "/chat_stream": {"user_input": "planted by another origin"},
    "/clear_context": {},
    "/set_generation_params": {"max_new_tokens": 1},
    "/set_feedback": {"message_id": "x", "is_like": True},
    "/new_chat": {},  # (it swaps the visitor's conversation for a fresh one)
}


def _server(make_chat_stream: Any, serve: Any, **options: Any) -> LiveServer:
    chat_stream = make_chat_stream(max_new_tokens=4)
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, webui=True, **options)
    server: LiveServer = serve(app)
    return server


def _conversation(url: str, cookie: str) -> tuple[list[str], int]:
    """The conversation's messages and its `max_new_tokens`, as the visitor's own cookie reads them."""
    with httpx.Client(base_url=url, cookies={COOKIE: cookie}, timeout=HANG_GUARD) as client:
        messages = [message["content"] for message in client.get("/get_history").json()["messages"]]
        return messages, client.get("/get_generation_params").json()["generation_params"]["max_new_tokens"]


def _visitors_session(url: str) -> str:
    """A visitor's cookie, for a conversation of one turn."""
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as visitor:
        assert visitor.post("/chat_stream", json={"user_input": "remember 17"}).status_code == 200
        return visitor.cookies[COOKIE]


def test_another_origin_of_the_site_cannot_clear_retune_or_plant_in_a_visitors_conversation(
    browser: Browser, make_chat_stream: Any, serve: Any
) -> None:
    server = _server(make_chat_stream, serve)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(HANG_GUARD * 1000)
        page.goto(server.url + "/")
        mine = """async () => {const response = await fetch("/chat_stream", {method: "POST",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify({user_input: "remember 17"})});
            await response.text(); return response.status}"""  # the whole reply: the turn is stored
        assert page.evaluate(mine) == 200
        cookie = next(c["value"] for c in context.cookies() if c["name"] == COOKIE)
        before = _conversation(server.url, cookie)
        assert before[0][0] == "remember 17" and before[1] != 1

        # The visitor opens a page on another port of the same host: the same site, another origin.
        form = (
            f'<form id="clear" method="POST" action="{server.url}/clear_context" enctype="text/plain" target="sink">'
            '<input name="{}" value=""></form><iframe name="sink"></iframe>'
        )
        evil = serve(Starlette(routes=[Route("/", lambda request: HTMLResponse(form))])).url + "/"
        attacker = context.new_page()
        attacker.set_default_timeout(HANG_GUARD * 1000)
        attacker.goto(evil)
        statuses = {}
        with attacker.expect_response(f"{server.url}/clear_context") as cleared:
            attacker.evaluate("document.getElementById('clear').submit()")
        statuses["form /clear_context"] = cleared.value.status
        no_cors = """([url, body]) => fetch(url, {method: "POST", mode: "no-cors", credentials: "include",
            headers: {"Content-Type": "text/plain"}, body}).then(() => null)"""
        for route in ("/set_generation_params", "/chat_stream"):
            with attacker.expect_response(server.url + route) as answered:
                attacker.evaluate(no_cors, [server.url + route, json.dumps(CHANGES[route])])
            statuses[f"no-cors {route}"] = answered.value.status
    finally:
        context.close()
    # A turn the attack started may still be storing itself: the visitor's next turn waits for it.
    with httpx.Client(base_url=server.url, cookies={COOKIE: cookie}, timeout=HANG_GUARD) as visitor:
        assert wait_until(lambda: visitor.post("/chat_stream", json={"user_input": "and 18"}).status_code == 200)
    messages, max_new_tokens = _conversation(server.url, cookie)
    assert "planted by another origin" not in messages and messages[0] == "remember 17"
    assert messages[:2] == before[0] and max_new_tokens == before[1]
    assert statuses == dict.fromkeys(statuses, 403)


@pytest.mark.parametrize("route", list(CHANGES))
def test_a_cookie_carrying_post_from_another_origin_is_403_naming_the_origin_and_the_option(
    route: str, make_chat_stream: Any, serve: Any
) -> None:
    server = _server(make_chat_stream, serve)
    cookie = _visitors_session(server.url)
    before = _conversation(server.url, cookie)
    other = "http://127.0.0.1:1"
    body = json.dumps(CHANGES[route])
    by_origin = httpx.post(
        server.url + route, headers={**JSON, "Origin": other, "Cookie": f"{COOKIE}={cookie}"}, content=body
    )
    by_fetch_site = httpx.post(
        server.url + route,
        headers={**JSON, "Sec-Fetch-Site": "same-site", "Cookie": f"{COOKIE}={cookie}"},
        content=body,
    )
    assert (by_origin.status_code, by_fetch_site.status_code) == (403, 403)
    assert by_origin.json()["error"] == by_fetch_site.json()["error"] == "forbidden"
    detail = by_origin.json()["detail"]
    assert other in detail and "allowed_origins" in detail and "--allowed-origin" in detail
    assert "same-site" in by_fetch_site.json()["detail"]
    assert _conversation(server.url, cookie) == before


@pytest.mark.parametrize("route", list(CHANGES))
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_cookie_carrying_post_without_a_json_content_type_is_415(
    route: str, content_type: str | None, make_chat_stream: Any, serve: Any
) -> None:
    server = _server(make_chat_stream, serve)
    cookie = _visitors_session(server.url)
    before = _conversation(server.url, cookie)
    headers = {"Cookie": f"{COOKIE}={cookie}"} | ({"Content-Type": content_type} if content_type else {})
    response = httpx.post(server.url + route, headers=headers, content=json.dumps(CHANGES[route]))
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"
    assert "-H 'Content-Type: application/json'" in response.json()["detail"]
    assert _conversation(server.url, cookie) == before


def test_the_servers_own_origin_and_allowed_origins_may_post_with_the_cookie(make_chat_stream: Any, serve: Any) -> None:
    trusted = "https://App.Example.com:443/"  # spelled loosely: compared as a browser spells it
    server = _server(make_chat_stream, serve, allowed_origins=[trusted])
    cookie = _visitors_session(server.url)
    own = {"Origin": server.url}
    for headers in (own, {"Origin": "https://app.example.com"}, {"Sec-Fetch-Site": "same-origin"}, {}):
        response = httpx.post(
            server.url + "/set_generation_params",
            headers={**JSON, **headers, "Cookie": f"{COOKIE}={cookie}"},
            content=json.dumps({"max_new_tokens": 3}),
        )
        assert response.status_code == 200, (headers, response.text)
    # A POST with no body has no Content-Type to check (ChatStream's clients clear a conversation so):
    # only its origin counts.
    with httpx.Client(base_url=server.url, cookies={COOKIE: cookie}, timeout=HANG_GUARD) as client:
        assert client.post("/clear_context").status_code == 200
        assert client.post("/clear_context", headers={"Origin": "http://127.0.0.1:1"}).status_code == 403
    with pytest.raises(ValueError, match="not an origin"):
        _server(make_chat_stream, serve, allowed_origins=["https://app.example.com/path"])
    with pytest.raises(ValueError, match="a list of origins"):
        _server(make_chat_stream, serve, allowed_origins="https://app.example.com")


def test_a_post_without_the_cookie_or_with_a_bearer_key_is_not_checked(make_chat_stream: Any, serve: Any) -> None:
    # curl -d '{"user_input": ...}' sends a form's Content-Type; with no cookie it acts on nothing of anyone's.
    server = _server(make_chat_stream, serve)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert httpx.post(f"{server.url}/chat_stream", headers=form, content='{"user_input": "Hello"}').status_code == 200
    keyed = serve(
        ChatStreamMiddleware(Starlette(), chat_stream=make_chat_stream(max_new_tokens=4), serve=True, api_keys=["k"])
    )
    with httpx.Client(base_url=keyed.url, headers={"Authorization": "Bearer k"}, timeout=HANG_GUARD) as client:
        assert client.post("/chat_stream", json={"user_input": "Hello"}).status_code == 200
        assert COOKIE in client.cookies  # a client of the API with a cookie jar, and a key
        answer = client.post(
            "/chat_stream", headers={**form, "Origin": "http://elsewhere"}, content='{"user_input": "Hi"}'
        )
        assert answer.status_code == 200


def test_v1_takes_json_only(make_chat_stream: Any, serve: Any) -> None:
    server = _server(make_chat_stream, serve, openai=True)
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    refused = httpx.post(f"{server.url}/v1/chat/completions", headers={"Content-Type": "text/plain"}, content=body)
    assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type"
    assert httpx.post(f"{server.url}/v1/chat/completions", headers=JSON, content=body).status_code == 200


def test_a_bare_authorization_header_does_not_let_another_origin_use_the_cookie(
    make_chat_stream: Any, serve: Any
) -> None:
    """Only a key the middleware verified vouches for a request: with no `api_keys`, any page
    that CORS lets add headers could send `Authorization: x` beside its visitor's cookie."""
    server = _server(make_chat_stream, serve)
    cookie = _visitors_session(server.url)
    before = _conversation(server.url, cookie)
    headers = {**JSON, "Origin": "http://127.0.0.1:1", "Authorization": "x", "Cookie": f"{COOKIE}={cookie}"}
    for route, body in CHANGES.items():
        response = httpx.post(server.url + route, headers=headers, content=json.dumps(body), timeout=HANG_GUARD)
        assert response.status_code == 403, (route, response.text)
    assert _conversation(server.url, cookie) == before


def test_the_servers_origin_has_the_scheme_the_request_arrived_by(make_chat_stream: Any, serve: Any) -> None:
    """A page on `http://host` is not the origin `https://host` (one who can inject into plain HTTP
    could post so), whatever port the Host header names: the scheme is the server's, here the one
    its proxy's `X-Forwarded-Proto` says (uvicorn trusts it from 127.0.0.1), never the Origin's."""
    server = _server(make_chat_stream, serve)
    cookie = _visitors_session(server.url)
    behind_tls = {**JSON, "Host": "chat.test", "X-Forwarded-Proto": "https", "Cookie": f"{COOKIE}={cookie}"}

    def post(headers: dict[str, str]) -> httpx.Response:
        body = json.dumps({"max_new_tokens": 3})
        return httpx.post(server.url + "/set_generation_params", headers=headers, content=body, timeout=HANG_GUARD)

    assert post({**behind_tls, "Origin": "http://chat.test"}).status_code == 403
    assert post({**behind_tls, "Origin": "https://chat.test"}).status_code == 200
    # Over plain HTTP, an https Origin of the same host is refused with a word on the likely cause.
    refused = post({**JSON, "Cookie": f"{COOKIE}={cookie}", "Origin": server.url.replace("http:", "https:")})
    assert refused.status_code == 403 and "--forwarded-allow-ips" in refused.json()["detail"]


def test_with_https_only_the_servers_origin_is_https(make_chat_stream: Any, serve: Any) -> None:
    """`https_only` says the site is served over HTTPS (by a proxy that may not say so)."""
    server = _server(make_chat_stream, serve, https_only=True)
    first = httpx.post(f"{server.url}/chat_stream", json={"user_input": "hello"}, timeout=HANG_GUARD)
    name = f"__Host-{COOKIE}"
    headers = {**JSON, "Cookie": f"{name}={first.cookies[name]}"}
    body = json.dumps({"max_new_tokens": 3})
    for origin, status in ((server.url, 403), (server.url.replace("http:", "https:"), 200)):
        response = httpx.post(
            server.url + "/set_generation_params", headers={**headers, "Origin": origin}, content=body
        )
        assert response.status_code == status, (origin, response.text)


def test_cors_for_every_origin_gives_no_origin_the_visitors_cookie(
    browser: Browser, make_chat_stream: Any, serve: Any
) -> None:
    """`append_middlewares(app, {"cors": {"allow_origins": ["*"]}})`, ChatStream's open setup: a page
    on another origin of the site (another port) may call the APIs, but not with its visitor's
    cookie. Credentialed CORS for every origin let it read the visitor's history and, adding an
    `Authorization` header, post into the conversation."""
    chat_stream: ChatStream = make_chat_stream(max_new_tokens=4)
    app = FastAPI()
    chat_stream.append_middlewares(app, {"cors": {"allow_origins": ["*"]}})
    chat_stream.append_apis(app, {"all": True})
    server = serve(app)
    cookie = _visitors_session(server.url)
    before = _conversation(server.url, cookie)
    context = browser.new_context()
    try:
        context.add_cookies([{"name": COOKIE, "value": cookie, "url": server.url}])
        evil = serve(Starlette(routes=[Route("/", lambda request: HTMLResponse("<p>hi</p>"))])).url + "/"
        attacker = context.new_page()
        attacker.set_default_timeout(HANG_GUARD * 1000)
        attacker.goto(evil)
        attempt = """async ([url, init]) => {
            try { const response = await fetch(url, {credentials: "include", ...init});
                  return response.status + " " + await response.text(); }
            catch (error) { return "blocked: " + error.name; } }"""
        read = attacker.evaluate(attempt, [server.url + "/get_history", {}])
        plant = {
            "method": "POST",
            "headers": {"Content-Type": "application/json", "Authorization": "x"},
            "body": json.dumps({"user_input": "planted by another origin"}),
        }
        posted = attacker.evaluate(attempt, [server.url + "/chat_stream", plant])
        # Without the cookie, the APIs stay open to every origin: what "*" asked for.
        anonymous = attacker.evaluate(attempt, [server.url + "/get_history", {"credentials": "omit"}])
    finally:
        context.close()
    assert read.startswith("blocked"), read
    assert posted.startswith(("blocked", "403")), posted
    assert anonymous.startswith("200"), anonymous
    assert _conversation(server.url, cookie) == before
