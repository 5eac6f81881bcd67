"""Stop, then send at once: the next turn waits for the stopped one instead of getting 409."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette

from chatstream_asgi import ChatStreamMiddleware, MemoryStore, RedisStore

from .conftest import ModelHooks, Outcomes, open_chat, read_first_text

SECRET = "a-key-every-replica-shares"


@pytest.fixture(params=["memory", "redis"])
def replicas(request: pytest.FixtureRequest, make_chat_stream: Any, serve: Any) -> tuple[Any, Any, Outcomes]:
    """Two servers of one conversation: one process with a MemoryStore (the same server twice),
    or two replicas sharing Redis; one outcome recorder for both."""
    outcomes = Outcomes()

    def start(store: Any) -> Any:
        app = ChatStreamMiddleware(
            Starlette(),
            chat_stream=make_chat_stream(max_new_tokens=60),
            serve=True,
            callback=outcomes,
            session_store=store,
            secret_key=SECRET,
        )
        return serve(app)

    if request.param == "memory":
        server = start(MemoryStore())
        return server, server, outcomes
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    return start(RedisStore(url, prefix=prefix)), start(RedisStore(url, prefix=prefix)), outcomes


def test_stop_then_send_runs_the_next_turn_every_time(replicas: Any, hooks: ModelHooks) -> None:
    first, second, outcomes = replicas
    with first.client() as client:
        client.post("/chat_stream", json={"user_input": "hello", "max_new_tokens": 2})
        cookie = f"chatstream_session={client.cookies['chatstream_session']}"
    outcomes.wait()
    # Slow steps: the stopped turn is still finishing the step in flight when the next one arrives.
    hooks.step_delay = 0.2
    for turn in range(3):
        stopped = open_chat(first.url, f"stop me {turn}", cookie=cookie)
        read_first_text(stopped)
        stopped.close()  # the user pressed Stop ...
        with second.client(headers={"Cookie": cookie}) as client:  # ... and sent the next message at once
            sent = client.post("/chat_stream", json={"user_input": f"next {turn}", "max_new_tokens": 1})
        assert sent.status_code == 200, sent.text
        assert outcomes.wait(3 + 2 * turn)[-2:] == ["client_disconnected_while_streaming", "success"]
    prompt = outcomes.calls[-1][0].state.session.get_session()["chat_prompt"]
    asked = [message.get_message() for message in prompt.requester_messages]
    assert asked == ["hello", "stop me 0", "next 0", "stop me 1", "next 1", "stop me 2", "next 2"]
