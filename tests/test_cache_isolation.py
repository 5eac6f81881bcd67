"""The conversation cache is partitioned by tenant: no prompt borrows from another tenant's, so
nobody learns by timing what another sent (issue 20, finding 3). A tenant is the session on
`/chat_stream`, the API key (else the client address) on `/v1`; a request's `cache_salt` splits
it further. Only a system prompt the operator declared shared is prefilled once for all."""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from chatstream_asgi import ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine import OpenAIEngine

from .conftest import wait_until

FILLER = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches " * 12


def _letter(name: str, filler: str = FILLER) -> str:
    """A long private message whose secret (a name) comes first: a guess that is right shares
    the whole letter with it, a wrong one only its first word."""
    return f"Dear {name}, here is the plan we agreed on: {filler}"


class _Server:
    """A served `ChatStream` (chat, `/v1` and `/metrics`) and a way to see what each request
    borrowed from the conversation cache: `chatstream_cached_prompt_tokens_total`'s growth."""

    def __init__(self, make_chat_stream: Any, serve: Any, **options: Any) -> None:
        keys = options.pop("api_keys", None)
        chat_stream = make_chat_stream(max_new_tokens=2, **options)
        app = ChatStreamMiddleware(
            Starlette(), chat_stream=chat_stream, serve=True, openai=True, metrics=True, api_keys=keys
        )
        self.server = serve(app)
        self.model = chat_stream.name
        self.admin = keys[0] if keys else None

    def client(self, key: str | None = None) -> httpx.Client:
        """A client of its own (its own cookie jar: its own session)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.server.client(headers=headers)

    def _counters(self) -> tuple[float, float]:
        headers = {"Authorization": f"Bearer {self.admin}"} if self.admin else {}
        with self.server.client(headers=headers) as client:
            text = client.get("/metrics").text
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        cached = sum(s.value for s in samples if s.name == "chatstream_cached_prompt_tokens_total")
        finished = sum(s.value for s in samples if s.name == "chatstream_requests_total")
        return cached, finished

    def cached_tokens(self, send: Any) -> int:
        """Prompt tokens the request `send()` makes took from the cache instead of prefilling."""
        cached, finished = self._counters()
        response = send()
        assert response.status_code == 200, response.text
        assert wait_until(lambda: self._counters()[1] == finished + 1)  # its outcome is counted
        return int(self._counters()[0] - cached)


def _chat(client: httpx.Client, text: str, **fields: Any) -> httpx.Response:
    return client.post("/chat_stream", json={"user_input": text, **fields})


def _complete(client: httpx.Client, text: str, system: str | None = None, **fields: Any) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}
    ]
    return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **fields})


def test_a_session_borrows_nothing_from_another_sessions_prompt_but_its_own_next_turn_does(
    make_chat_stream: Any, serve: Any
) -> None:
    server = _Server(make_chat_stream, serve)
    with server.client() as victim, server.client() as attacker:
        assert server.cached_tokens(lambda: _chat(victim, _letter("Alice"))) == 0
        # The attacker sends the very same letter: under a shared cache it would prefill 1 token.
        assert server.cached_tokens(lambda: _chat(attacker, _letter("Alice"))) == 0
        assert server.cached_tokens(lambda: _chat(victim, "thanks")) > len(FILLER) // 4  # its letter, cached


def test_guessing_anothers_secret_by_timing_learns_nothing(make_chat_stream: Any, serve: Any) -> None:
    """The attack of the finding: the victim sent a letter; an attacker sends it again with each
    guessed name, each from a fresh session, and times the replies. Under a shared cache the
    right guess skips prefilling the whole letter (~1,700 tokens: about 5x faster here);
    partitioned, the right and the wrong guesses cost the same, token for token."""
    letter = FILLER * 3
    server = _Server(make_chat_stream, serve)
    with server.client() as victim:
        _chat(victim, _letter("Alice", letter))
    seconds: dict[str, list[float]] = {"right": [], "wrong": []}
    borrowed: dict[str, set[int]] = {"right": set(), "wrong": set()}

    def guess(kind: str, name: str) -> None:
        with server.client() as attacker:  # a fresh session for every guess

            def send() -> httpx.Response:
                started = time.perf_counter()
                response = _chat(attacker, _letter(name, letter))
                seconds[kind].append(time.perf_counter() - started)
                return response

            borrowed[kind].add(server.cached_tokens(send))

    wrong_names = ("Mallory", "Trudy", "Oscar", "Peggy", "Victor", "Walter", "Judy", "Sybil", "Niaj")
    for wrong in wrong_names:  # distinct: no wrong guess helps the next
        guess("right", "Alice")  # interleaved, so a busy moment of the machine hits both alike
        guess("wrong", wrong)
    assert borrowed == {"right": {0}, "wrong": {0}}
    assert statistics.median(seconds["right"]) > 0.5 * statistics.median(seconds["wrong"]), seconds


def test_api_keys_are_tenants_of_their_own_on_v1(make_chat_stream: Any, serve: Any) -> None:
    server = _Server(make_chat_stream, serve, api_keys=["key-a", "key-b"])
    with server.client("key-a") as a, server.client("key-b") as b:
        assert server.cached_tokens(lambda: _complete(a, _letter("Alice"))) == 0
        assert server.cached_tokens(lambda: _complete(b, _letter("Alice"))) == 0
        assert server.cached_tokens(lambda: _complete(a, _letter("Alice"))) > len(FILLER) // 4


def test_requests_share_the_cache_only_with_the_same_cache_salt(make_chat_stream: Any, serve: Any) -> None:
    """Without keys every `/v1` request from one address is one tenant; `cache_salt` splits it.
    On `/chat_stream` it splits one session's turns the same way."""
    server = _Server(make_chat_stream, serve)
    with server.client() as client:
        assert server.cached_tokens(lambda: _complete(client, _letter("Alice"), cache_salt="red")) == 0
        assert server.cached_tokens(lambda: _complete(client, _letter("Alice"), cache_salt="blue")) == 0
        assert server.cached_tokens(lambda: _complete(client, _letter("Alice"))) == 0
        assert server.cached_tokens(lambda: _complete(client, _letter("Alice"), cache_salt="red")) > 0
        assert server.cached_tokens(lambda: _chat(client, _letter("Bob"), cache_salt="red")) == 0
        assert server.cached_tokens(lambda: _chat(client, "and?", cache_salt="green")) == 0
        assert server.cached_tokens(lambda: _chat(client, "so?", cache_salt="red")) > len(FILLER) // 4


def test_a_declared_shared_system_prompt_is_prefilled_once_for_every_tenant_and_nothing_after_it(
    make_chat_stream: Any, serve: Any
) -> None:
    system = "You are a careful assistant. " + FILLER
    server = _Server(make_chat_stream, serve, api_keys=["key-a", "key-b"], cache_shared_system_prompt=system)
    plain = _Server(make_chat_stream, serve, api_keys=["key-a", "key-b"])
    for each, shares in ((server, True), (plain, False)):
        with each.client("key-a") as a, each.client("key-b") as b:
            assert each.cached_tokens(lambda c=a: _complete(c, _letter("Alice"), system)) == 0
            borrowed = each.cached_tokens(lambda c=b: _complete(c, _letter("Alice"), system))
            own = each.cached_tokens(lambda c=b: _complete(c, _letter("Alice"), system))  # b's own, now
        if shares:
            # The system prompt (over a quarter of the prompt), and not a's letter after it: the
            # same prompt from b itself then borrows the letter too.
            assert len(FILLER) // 4 < borrowed < own - len(FILLER) // 4
        else:
            assert borrowed == 0 and own > 2 * len(FILLER) // 4


@pytest.mark.parametrize("salt", ["", "x" * 257, 7, ["a"], True])
def test_a_bad_cache_salt_is_refused_on_both_routes(make_chat_stream: Any, serve: Any, salt: object) -> None:
    server = _Server(make_chat_stream, serve)
    with server.client() as client:
        chat = _chat(client, "hello", cache_salt=salt)
        completion = _complete(client, "hello", cache_salt=salt)
    assert chat.status_code == 422 and chat.json()["error"] == "invalid_parameter"
    assert "cache_salt" in chat.json()["detail"]
    assert completion.status_code == 422 and completion.json()["error"]["param"] == "cache_salt"
    assert "x" * 100 not in chat.text + completion.text  # never echoed whole


def test_a_front_keeps_its_users_apart_in_its_upstreams_cache(make_chat_stream: Any, serve: Any) -> None:
    """Through `OpenAIEngine`, every user of the front reaches the upstream as one client: the front
    sends each one's partition as `cache_salt`, so the upstream lends a user only their own prefixes.
    Without it, the second user's copy of the letter was prefilled from the first's."""
    upstream = _Server(make_chat_stream, serve)
    front_stream = ChatStream(engine=OpenAIEngine(f"{upstream.server.url}/v1", model=upstream.model), max_new_tokens=2)
    front = serve(ChatStreamMiddleware(Starlette(), chat_stream=front_stream, serve=True))
    with front.client() as victim, front.client() as attacker:
        assert upstream.cached_tokens(lambda: _chat(victim, _letter("Alice"))) == 0
        assert upstream.cached_tokens(lambda: _chat(attacker, _letter("Alice"))) == 0
        assert upstream.cached_tokens(lambda: _chat(victim, "thanks")) > len(FILLER) // 4
