"""ChatStream's README app with a bundled prompt class (`chat_prompt_clazz=ChatPrompt`) runs with
only the import changed, over real HTTP, and the conversation renders in the preset's format."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatstream_asgi import ChatPromptTogetherRedPajamaINCITEChat

from ..conftest import wait_until

APP = Path(__file__).resolve().parent / "apps" / "readme_preset.py"
# ChatStream's README starts its queue worker in @app.on_event("startup"), which FastAPI deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:\\s*on_event is deprecated:DeprecationWarning")


@pytest.fixture
def preset_app(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The app module, its `from chatstream import` line changed and nothing else."""
    monkeypatch.setenv("CHATSTREAM_MODEL", str(model_dir))
    source = APP.read_text()
    assert "from chatstream import ChatStream, ChatPromptTogetherRedPajamaINCITEChat as ChatPrompt" in source
    module = types.ModuleType("chatstream_app_readme_preset")
    exec(
        compile(source.replace("from chatstream import ", "from chatstream_asgi import "), str(APP), "exec"),
        module.__dict__,
    )
    assert wait_until(lambda: module.chat_stream.ready)
    yield module
    module.chat_stream.close()
    sys.modules.pop(module.__name__, None)


def test_readme_app_with_a_preset_keeps_a_redpajama_conversation_in_its_session(preset_app: Any, serve: Any) -> None:
    server = serve(preset_app.app)
    with server.client() as client:
        first = client.post("/chat_stream", json={"user_input": "Who is Alan Turing"})
        second = client.post("/chat_stream", json={"user_input": "Tell me more"})
    assert first.status_code == 200 and second.status_code == 200
    (entry,) = preset_app.app.user_middleware[0].kwargs["store"].raw_memory_store.values()
    prompt = entry["store"]["chat_prompt"]  # the live prompt object fastsession keeps, as in ChatStream
    assert isinstance(prompt, ChatPromptTogetherRedPajamaINCITEChat)
    assert prompt.create_prompt() == (
        f"<human>: Who is Alan Turing\n<bot>: {first.text}\n<human>: Tell me more\n<bot>: {second.text}\n"
    )
    assert prompt.generation_stop_strs() == ["<human>:", "<|endoftext|>"]
