"""One copy of the history rules (`core.history`): the console keeps a conversation as the server does.

The console used to keep its own copy of the rules, and it had drifted: it stored a reply unstripped
where the server strips it, and outside chat mode it left out the user's text the server's reply
continues. Each test runs one turn through a real server and one through the console, on the same
engine and prompt class, and compares what the client saw and what the conversation kept.
"""

from __future__ import annotations

from typing import Any

import anyio
from starlette.applications import Starlette

from chatstream_asgi import AbstractChatPrompt, ChatStream, ChatStreamMiddleware, MemoryStore
from chatstream_asgi.engine.mock import MockEngine
from chatstream_asgi.frontends.console import ConsoleConversation

from .test_prompt_replies import LinePrompt, chat_once, prompt_class

QUESTION = "Capital of France?"


def console_turn(chat_stream: ChatStream, user_input: str) -> tuple[str, AbstractChatPrompt]:
    """One console turn: the text it printed and the conversation it kept."""
    conversation = ConsoleConversation(chat_stream.service)

    async def reply() -> str:
        return "".join([piece async for piece in conversation.reply(user_input)])

    return anyio.run(reply), conversation.prompt


def both_turns(serve: Any, prompt: type[AbstractChatPrompt], reply: str) -> tuple[tuple[str, Any], tuple[str, Any]]:
    chat_stream = ChatStream(engine=MockEngine(reply, tokens_per_second=1000), chat_prompt_clazz=prompt)
    try:
        return chat_once(serve, chat_stream, QUESTION), console_turn(chat_stream, QUESTION)
    finally:
        chat_stream.close()


class _ContinuingPrompt(LinePrompt):
    """A prompt class with chat mode off: the model continues the user's text."""

    def __init__(self) -> None:
        super().__init__()
        self.set_chat_mode_enabled(False)


def test_the_console_keeps_a_reply_stripped_as_the_server_does(serve: Any) -> None:
    (served_text, served), (console_text, consoled) = both_turns(serve, prompt_class(), "  Paris, of course.  ")
    assert console_text == served_text
    assert consoled.get_responder_last_msg() == served.get_responder_last_msg() == "Paris, of course."
    assert consoled.get_requester_last_msg() == served.get_requester_last_msg() == QUESTION


def test_outside_chat_mode_the_console_reply_continues_the_users_text_as_the_server_does(serve: Any) -> None:
    (served_text, served), (console_text, consoled) = both_turns(serve, _ContinuingPrompt, " Paris.")
    assert served_text.startswith("User: " + QUESTION) and served_text.endswith("Paris.")
    assert console_text == served_text
    assert consoled.get_responder_last_msg() == served.get_responder_last_msg()


class _SlowStore(MemoryStore):
    """A store whose writes take a while, as a remote one's may."""

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        await anyio.sleep(0.5)
        await super().save(session_id, data)


def test_a_turn_is_saved_before_its_client_reads_the_end_of_the_reply(serve: Any) -> None:
    """A client that asks for the history the moment the reply ends (the page reloading, a
    keep-alive connection's next request) finds the turn, however slow the store."""
    chat_stream = ChatStream(engine=MockEngine(tokens_per_second=1000))
    app = ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, session_store=_SlowStore(), webui=True)
    try:
        with serve(app).client() as client:
            assert client.post("/chat_stream", json={"user_input": "remember this"}).text == "remember this"
            messages = client.get("/get_history").json()["messages"]
    finally:
        chat_stream.close()
    assert [(m["role"], m["content"]) for m in messages] == [("user", "remember this"), ("assistant", "remember this")]
