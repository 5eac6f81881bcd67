"""ChatStream apps run with only the import changed (README: "code written for ChatStream runs
after changing the import"), over real HTTP.

Each app under `apps/` is written as ChatStream's README, docs and the seed write them, with
`from chatstream import ...`; the loader changes that line and nothing else.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import wait_until

APPS = Path(__file__).resolve().parent / "apps"
# ChatStream's README starts its queue worker in @app.on_event("startup"), which FastAPI deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:\\s*on_event is deprecated:DeprecationWarning")


@pytest.fixture
def load_app(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("CHATSTREAM_MODEL", str(model_dir))
    loaded: list[Any] = []

    def load(name: str) -> Any:
        source = (APPS / f"{name}.py").read_text()
        assert "from chatstream import " in source
        changed = source.replace("from chatstream import ", "from chatstream_asgi import ")
        module = types.ModuleType(f"chatstream_app_{name}")
        exec(compile(changed, str(APPS / f"{name}.py"), "exec"), module.__dict__)
        loaded.append(module)
        assert wait_until(lambda: module.chat_stream.ready)
        return module

    yield load
    for module in loaded:
        module.chat_stream.close()
        sys.modules.pop(module.__name__, None)


def test_readme_app_behind_fastsession_keeps_the_conversation_in_its_session(load_app: Any, serve: Any) -> None:
    app = load_app("readme_fastsession")
    server = serve(app.app)
    with server.client() as client:
        first = client.post("/chat_stream", json={"user_input": "Hello"})
        assert first.status_code == 200 and first.text
        assert "sid" in client.cookies  # fastsession's cookie, not ours
        assert "chatstream_session" not in client.cookies
        assert client.post("/chat_stream", json={"user_input": "again"}).status_code == 200
    (store,) = [entry["store"] for entry in app.app.user_middleware[0].kwargs["store"].raw_memory_store.values()]
    prompt = store["chat_prompt"]  # the live prompt object, as ChatStream keeps it
    assert [m["content"] for m in prompt.to_messages() if m["role"] == "user"] == ["Hello", "again"]


def test_callback_form_on_another_path_reads_the_fastsession_prompt(load_app: Any, serve: Any) -> None:
    app = load_app("seed_forms_fastsession")
    server = serve(app.app)
    with server.client() as client:
        assert client.post("/api/chat", json={"user_input": "first question"}).status_code == 200
        assert client.post("/api/chat", json={"user_input": "second question"}).status_code == 200
    assert wait_until(lambda: len(app.finished) == 2)
    assert [outcome for outcome, _ in app.finished] == ["success", "success"]
    assert "first question" in app.finished[1][1] and "second question" in app.finished[1][1]


def test_intercepting_form_behind_fastsession_hands_the_body_on_or_refuses(load_app: Any, serve: Any) -> None:
    app = load_app("seed_forms_fastsession")
    server = serve(app.app)
    with server.client() as client:
        accepted = client.post("/api/intercept", json={"user_input": "Hello"})
        refused = client.post("/api/intercept", json={"user_input": "a forbidden topic"})
    assert accepted.status_code == 200 and accepted.text
    assert accepted.headers["x-chatstream-last-generated-message-id"]
    assert refused.status_code == 403 and refused.json() == {"error": "refused"}


def test_app_without_any_middleware_keeps_the_conversation_with_its_own_cookie(load_app: Any, serve: Any) -> None:
    app = load_app("no_middleware")
    server = serve(app.app)
    with server.client() as client:
        assert client.post("/api/chat", json={"user_input": "one"}).status_code == 200
        assert "chatstream_session" in client.cookies
        assert client.post("/api/chat", json={"user_input": "two"}).status_code == 200
    assert wait_until(lambda: len(app.finished) == 2)
    assert app.finished == [("success", "one"), ("success", "two")]
