"""The rest of ChatStream's surface, over real HTTP: client roles, mock modes, append_middlewares
and append_apis, `logger` and `params`; the app is `apps/roles_and_mock.py`, run with only the
import changed."""

from __future__ import annotations

import hashlib
import logging
import types
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from chatstream_asgi import ChatStream
from chatstream_asgi.compat.mock import ROUND_REPLIES

APPS = Path(__file__).resolve().parent / "apps"
pytestmark = pytest.mark.filterwarnings("ignore:\\s*on_event is deprecated:DeprecationWarning")


@pytest.fixture
def roles_app(serve: Any) -> Any:
    source = (APPS / "roles_and_mock.py").read_text().replace("from chatstream import ", "from chatstream_asgi import ")
    module = types.ModuleType("chatstream_app_roles_and_mock")
    exec(compile(source, str(APPS / "roles_and_mock.py"), "exec"), module.__dict__)
    yield serve(module.app)
    module.chat_stream.close()


def test_round_mock_replies_by_turn(roles_app: Any) -> None:
    with roles_app.client() as client:
        first = client.post("/chat_stream", json={"user_input": "hi"})
        second = client.post("/chat_stream", json={"user_input": "and?"})
    assert (first.text, second.text) == (ROUND_REPLIES[0], ROUND_REPLIES[1])


def test_anonymous_browser_may_chat_but_not_read_the_prompt(roles_app: Any) -> None:
    with roles_app.client() as client:
        assert client.post("/chat_stream", json={"user_input": "hi"}).status_code == 200
        refused = client.get("/get_prompt")
    assert refused.status_code == 403
    assert refused.json()["success"] is False and refused.json()["error"] == "forbidden"


def test_pass_phrase_typed_into_the_chat_promotes_the_session_and_never_reaches_history(roles_app: Any) -> None:
    with roles_app.client() as client:
        client.post("/chat_stream", json={"user_input": "hi"})
        granted = client.post("/chat_stream", json={"user_input": "i am a developer"})
        prompt = client.get("/get_prompt")
    assert granted.status_code == 200 and granted.text == "New role: 'developer' has been granted"
    assert granted.headers["x-chatstream-api-devtool-enabled"] == "enabled"
    assert prompt.status_code == 200
    assert "hi" in prompt.json()["prompt"] and "developer" not in prompt.json()["prompt"]


@pytest.mark.parametrize(
    "body",
    [{"user_input": "i am a developer", "regenerate": True}, {"edit": "i am a developer"}],
    ids=["regenerate", "edit"],
)
def test_a_pass_phrase_counts_only_as_a_new_message(roles_app: Any, body: dict[str, Any]) -> None:
    with roles_app.client() as client:
        client.post("/chat_stream", json={"user_input": "hi"})
        again = client.post("/chat_stream", json=body)
        prompt = client.get("/get_prompt")
    assert again.status_code == 200 and "granted" not in again.text
    assert "x-chatstream-api-devtool-enabled" not in again.headers
    assert prompt.status_code == 403  # still the anonymous role


def test_program_with_the_auth_header_gets_its_role_and_without_it_the_program_default(roles_app: Any) -> None:
    with roles_app.client() as client:
        assert client.get("/get_load").status_code == 200  # the program default allows get_load
        assert client.get("/get_resource_usage").status_code == 403
        admin = client.get("/get_resource_usage", headers={"X-ChatStream-Auth-Header": "admin-secret-phrase"})
        wrong = client.get("/get_resource_usage", headers={"X-ChatStream-Auth-Header": "guess"})
    assert admin.status_code == 200 and admin.json()["success"] is True
    assert wrong.status_code == 403


def test_sha256_pass_phrases_are_compared_as_hashes(serve: Any) -> None:
    digest = hashlib.sha256(b"open sesame").hexdigest()
    roles = {
        "user": {"apis": {"allow": ["chat_stream"], "auth_method": "nothing", "use_session": True}},
        "dev": {
            "apis": {
                "allow": "all",
                "auth_method": "ui_pass_phrase_sha256",
                "ui_pass_phrase_sha256": digest,
                "use_session": True,
            }
        },
    }
    chat_stream = ChatStream(use_mock_response=True, client_roles=roles)
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app, {"all": True})
    with serve(app).client() as client:
        assert client.get("/get_generation_params").status_code == 403
        granted = "New role: 'dev' has been granted"
        assert client.post("/chat_stream", json={"user_input": digest}).text != granted
        assert client.post("/chat_stream", json={"user_input": "open sesame"}).text == granted
        assert client.get("/get_generation_params").status_code == 200


@pytest.mark.parametrize(
    "roles",
    [
        {"user": {"apis": {"allow": ["chat_stream"], "auth_method": "nothing", "use_session": False}}},
        {"user": {"apis": {"allow": ["chat"], "auth_method": "nothing", "use_session": True}}},
        {"user": {"apis": {"allow": "all", "auth_method": "password", "use_session": True}}},
    ],
    ids=["no_browser_default", "unknown_api", "unknown_method"],
)
def test_a_malformed_client_roles_is_refused_at_start(roles: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="client_roles"):
        ChatStream(use_mock_response=True, client_roles=roles)


@pytest.mark.parametrize(("kind", "expected"), [("echo", "say this back"), ("long", "This is a long mock reply")])
def test_mock_params_select_echo_and_long_replies(serve: Any, kind: str, expected: str) -> None:
    chat_stream = ChatStream(use_mock_response=True, mock_params={"type": kind, "time_per_token_sec": 0})
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app, {"include": ["chat_stream"]})
    with serve(app).client() as client:
        reply = client.post("/chat_stream", json={"user_input": "say this back"}).text
    assert reply.startswith(expected)


def test_append_apis_all_mounts_chat_stream_on_an_app_without_our_middleware(serve: Any) -> None:
    chat_stream = ChatStream(use_mock_response=True, mock_params={"type": "echo", "time_per_token_sec": 0})
    app = FastAPI()
    chat_stream.append_apis(app, {"all": True})
    with serve(app).client() as client:
        assert client.post("/chat_stream", json={"user_input": "echo me"}).text == "echo me"
        assert client.get("/get_load").json()["success"] is True


def test_cors_is_installed_only_when_asked_and_exposes_chatstreams_headers(serve: Any) -> None:
    chat_stream = ChatStream(use_mock_response=True)
    plain, open_app = FastAPI(), FastAPI()
    chat_stream.append_middlewares(plain)
    chat_stream.append_middlewares(open_app, {"cors": {"allow_origins": ["http://front.example"]}})
    for app in (plain, open_app):
        chat_stream.append_apis(app, {"include": ["chat_stream"]})
    origin = {"Origin": "http://front.example"}
    with serve(plain).client() as client:
        closed = client.post("/chat_stream", json={"user_input": "x"}, headers=origin)
        # With the cookie, another origin is refused unless CORS named it (same-site CSRF).
        assert client.post("/chat_stream", json={"user_input": "y"}, headers=origin).status_code == 403
    with serve(open_app).client() as client:
        opened = client.post("/chat_stream", json={"user_input": "x"}, headers=origin)
        assert client.post("/chat_stream", json={"user_input": "y"}, headers=origin).status_code == 200
    assert "access-control-allow-origin" not in closed.headers
    assert opened.headers["access-control-allow-origin"] == "http://front.example"
    exposed = opened.headers["access-control-expose-headers"].lower()
    assert "x-chatstream-last-generated-message-id" in exposed and "x-chatstream-api-devtool-enabled" in exposed


def test_logger_is_the_one_passed_or_the_packages() -> None:
    mine = logging.getLogger("my_app")
    assert ChatStream(use_mock_response=True, logger=mine).logger is mine
    assert ChatStream(use_mock_response=True).logger.name == "chatstream_asgi"


def test_params_read_as_chatstreams_dict() -> None:
    params = ChatStream(use_mock_response=True, temperature=0.5, top_k=None).params
    assert params.get("temperature") == 0.5 and params["max_new_tokens"] == 256
    assert params.get("top_k_value") is None and params.get("use_top_k_sampling") is False
    assert params.get("not_a_key", "fallback") == "fallback" and "top_p_value" in params
