"""The ChatStream constructor: ChatStream's arguments, our defaults, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.applications import Starlette

from chatstream_asgi import AbstractChatPrompt, ChatStream, ChatStreamMiddleware
from chatstream_asgi.engine import resolve_device

from .conftest import Outcomes


def test_defaults_follow_the_design(make_chat_stream: Any) -> None:
    made = make_chat_stream(temperature=0.7, max_new_tokens=256)
    assert made.load() == {"processing": 0, "waiting": 0, "num_of_concurrent_executions": 2, "max_queue_size": 5}
    assert made.params.temperature == 0.7 and made.params.top_k == 50 and made.params.top_p == 0.9
    assert made.context_len == 2048 and made.stream_format == "delta" and made.too_many_request_as_http_error


def test_name_defaults_to_the_model_folder(make_chat_stream: Any, model_dir: Path) -> None:
    assert make_chat_stream().name == model_dir.name
    assert make_chat_stream(name="my-model").name == "my-model"


def test_chatstreams_other_arguments_are_accepted_with_one_warning(
    make_chat_stream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="chatstream_asgi"):
        make_chat_stream(token_sampler=None, locale="ja", probe_mode_enabled=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "token_sampler" in warnings[0].getMessage()


def test_an_argument_chatstream_never_had_is_a_type_error(model: Any, tokenizer: Any) -> None:
    with pytest.raises(TypeError, match="max_tokens"):
        ChatStream(model=model, tokenizer=tokenizer, max_tokens=5)


@pytest.mark.anyio
async def test_start_queue_worker_is_accepted(make_chat_stream: Any) -> None:
    await make_chat_stream().start_queue_worker()


def test_context_must_leave_room_for_the_prompt(model: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="context_len"):
        ChatStream(model=model, tokenizer=tokenizer, context_len=256, max_new_tokens=256)


def test_unknown_stream_format_is_refused(model: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="stream_format"):
        ChatStream(model=model, tokenizer=tokenizer, stream_format="json")  # type: ignore[arg-type]


def test_out_of_range_default_parameter_is_refused(model: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="temperature"):
        ChatStream(model=model, tokenizer=tokenizer, temperature=5)


def test_auto_device_picks_what_this_machine_has() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type in (expected, "mps")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


def test_tokenizer_without_chat_template_needs_a_prompt_class(model: Any, tokenizer: Any) -> None:
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_prompt_clazz"):
        ChatStream(model=model, tokenizer=tokenizer)


class PlainPrompt(AbstractChatPrompt):
    """A ChatStream-style prompt class for a model without a chat template."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("User")
        self.set_responder("Bot")

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:
        chat_prompt.set_system("A chat.")

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        lines = [self.system] + [f"{c.get_role()}: {c.get_message() or ''}" for c in self.get_contents(opts)]
        return "\n".join(lines)


def test_chatstream_style_prompt_class_drives_the_conversation(model: Any, tokenizer: Any, serve: Any) -> None:
    tokenizer.chat_template = None
    chat_stream = ChatStream(
        model=model, tokenizer=tokenizer, chat_prompt_clazz=PlainPrompt, temperature=0, max_new_tokens=5
    )
    outcomes = Outcomes()
    try:
        server = serve(ChatStreamMiddleware(Starlette(), chat_stream=chat_stream, serve=True, callback=outcomes))
        with server.client() as client:
            client.post("/chat_stream", json={"user_input": "Hi"})
            outcomes.wait(1)
            client.post("/chat_stream", json={"user_input": "More"})
            outcomes.wait(2)
    finally:
        chat_stream.close()
    prompt = outcomes.calls[1][0].state.session.get_session()["chat_prompt"]
    assert isinstance(prompt, PlainPrompt)
    assert prompt.create_prompt().startswith("A chat.\nUser: Hi\nBot: ")
    assert prompt.get_turn() == 2
