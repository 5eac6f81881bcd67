"""Old module paths keep working for one release: each re-exports what it had, and says where it went."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

#: Each old path, a name it exported, and the module that now defines that name.
OLD_PATHS = [
    ("chatstream_asgi.middleware", "ChatStreamMiddleware", "chatstream_asgi.asgi.middleware"),
    ("chatstream_asgi.middleware", "check_shared_key", "chatstream_asgi.asgi.cookie_sessions"),
    ("chatstream_asgi.chat_stream", "ChatStream", "chatstream_asgi.compat.chat_stream"),
    ("chatstream_asgi.session", "MemoryStore", "chatstream_asgi.sessions.memory"),
    ("chatstream_asgi.session", "Session", "chatstream_asgi.sessions.session"),
    ("chatstream_asgi.session", "stored_text", "chatstream_asgi.sessions.store"),
    ("chatstream_asgi.redis_store", "RedisStore", "chatstream_asgi.sessions.redis_store"),
    ("chatstream_asgi.params", "parse_chat_request", "chatstream_asgi.core.params"),
    ("chatstream_asgi.prompt", "fit_prompt", "chatstream_asgi.core.prompt"),
    ("chatstream_asgi.admission", "ReplicaAffinity", "chatstream_asgi.runtime.replicas"),
    ("chatstream_asgi.admission", "Admission", "chatstream_asgi.runtime.admission"),
    ("chatstream_asgi.demo_model", "ensure_demo_model", "chatstream_asgi.frontends.demo_model"),
    ("chatstream_asgi.cli", "main", "chatstream_asgi.frontends.cli"),
]


@pytest.mark.parametrize(("old", "name", "home"), OLD_PATHS)
def test_an_old_module_path_gives_the_same_object_and_a_deprecation_warning(old: str, name: str, home: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(home), name)
    assert any(issubclass(w.category, DeprecationWarning) and home.rsplit(".", 1)[0] in str(w.message) for w in caught)


def test_every_name_a_shim_lists_is_there() -> None:
    for old in {old for old, _, _ in OLD_PATHS}:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(old)
        assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_the_old_command_path_still_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream_asgi.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("chatstream-asgi"), result.stderr
