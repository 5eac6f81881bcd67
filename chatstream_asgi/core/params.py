"""Sampling parameters, and the parsing of a `/chat_stream` request body into a validated turn.

Validation happens once, here, before admission: a request that gets a slot is known to be
well formed, so nothing after admission has to undo a half-started turn because of bad input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from chatstream_asgi.errors import InvalidJSON, InvalidParameter, InvalidRequest, quoted

#: Request keys (ChatStream's names first) and the `GenerationParams` field each sets.
_PARAM_KEYS: dict[str, str] = {
    "temperature": "temperature",
    "top_k_value": "top_k",
    "top_k": "top_k",
    "top_p_value": "top_p",
    "top_p": "top_p",
    "max_new_tokens": "max_new_tokens",
    "stop": "stop",
}


#: Stop strings one request may add, and the longest one (each is checked on every step).
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
#: The largest seed: what a torch generator takes (OpenAI's `seed` is a 64-bit integer too).
MAX_SEED = 2**64 - 1
#: The longest `cache_salt` a request may carry (vLLM's name for the field).
MAX_CACHE_SALT = 256


@dataclass(frozen=True)
class GenerationParams:
    """How one reply is sampled. `temperature == 0` means greedy; `top_k == 0` means no top-k."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    #: Seeds sampling: the batching engine draws a seeded row's numbers from its seed alone; the per-slot
    #: engine seeds the process's one generator, so there it holds only while nothing overlaps.
    seed: int | None = None
    #: Whose kept prompt prefixes this generation may borrow (`cache_scope`): only those of
    #: generations with the same scope, so one tenant cannot time another's prompts.
    cache_scope: str = ""

    def __post_init__(self) -> None:
        if self.seed is not None:
            _check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        if not isinstance(self.cache_scope, str):
            raise TypeError(f"cache_scope must be a string, not {type(self.cache_scope).__name__}")
        for field in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop"):
            _check_field(field, field, getattr(self, field))
        # transformers refuses int temperatures, and 5.0 tokens is 5 tokens to a user.
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop", tuple(self.stop))

    # ChatStream's `chat_stream.params` is a dict under its names: code that reads it keeps working.

    def as_chatstream_dict(self) -> dict[str, Any]:
        """These parameters under ChatStream's `params` keys."""
        return {
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "use_top_k_sampling": self.top_k > 0,
            "top_k_value": self.top_k or None,
            "use_top_p_sampling": self.top_p < 1.0,
            "top_p_value": self.top_p,
            "use_repetition_penalty": self.repetition_penalty != 1.0,
            "repetition_penalty": self.repetition_penalty,
        }

    def get(self, key: str, default: Any = None) -> Any:
        """`params.get("temperature")`, as on ChatStream's dict."""
        return self.as_chatstream_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.as_chatstream_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.as_chatstream_dict()

    def keys(self) -> list[str]:
        """ChatStream's key names."""
        return list(self.as_chatstream_dict())

    def with_overrides(self, overrides: dict[str, Any], *, max_new_tokens_limit: int) -> GenerationParams:
        """A copy with request or session overrides applied; `InvalidParameter` names a bad one.

        `max_new_tokens` may not exceed the server's own limit: a client cannot buy a longer
        slot than the operator configured. Request stop strings add to the server's.
        """
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            field = _PARAM_KEYS.get(key)
            if field is None:
                continue
            _check_field(key, field, value)
            if field == "max_new_tokens":
                _check_number(key, value, 1, max_new_tokens_limit, integer=True)
            changes[field] = tuple(self.stop) + tuple(value) if field == "stop" else value
        return dataclasses.replace(self, **changes)


#: The per-session parameters `/set_generation_params` keeps, under ChatStream's names.
SESSION_PARAM_NAMES = {
    "temperature": "temperature",
    "top_k": "top_k_value",
    "top_p": "top_p_value",
    "max_new_tokens": "max_new_tokens",
}


def session_params_update(
    stored: dict[str, Any], update: dict[str, Any], *, defaults: GenerationParams
) -> dict[str, Any]:
    """The session's parameters after `update` (a `/set_generation_params` body); nothing is
    changed if any value is bad. A null value returns that parameter to the server's default."""
    merged = dict(stored)
    for key, value in update.items():
        field = _PARAM_KEYS.get(key)
        if field is None or field == "stop":
            allowed = "temperature, top_k_value (top_k), top_p_value (top_p), max_new_tokens"
            raise InvalidRequest(f"unknown generation parameter {quoted(key)}; known: {allowed}")
        name = SESSION_PARAM_NAMES[field]
        if value is None:
            merged.pop(name, None)
            continue
        defaults.with_overrides({key: value}, max_new_tokens_limit=defaults.max_new_tokens)
        merged[name] = float(value) if field in ("temperature", "top_p") else int(value)
    return merged


def session_params_view(stored: dict[str, Any], defaults: GenerationParams) -> dict[str, Any]:
    """The parameters a session's next turn will use, under ChatStream's names."""
    return {
        "temperature": defaults.temperature,
        "top_k_value": defaults.top_k,
        "top_p_value": defaults.top_p,
        "max_new_tokens": defaults.max_new_tokens,
        **stored,
    }


def _check_field(key: str, field: str, value: object) -> None:
    """Check `value` for `field`, naming it `key` (the client's spelling) in the error."""
    if field == "max_new_tokens":
        _check_number(key, value, 1, None, integer=True)
    elif field == "temperature":
        _check_number(key, value, 0, 2)
    elif field == "top_k":
        _check_number(key, value, 0, 500, integer=True)
    elif field == "top_p":
        _check_number(key, value, 0, 1, open_low=True)
    elif field == "repetition_penalty":
        _check_number(key, value, 0, None, open_low=True)
    else:
        _check_stop(key, value)


@dataclass(frozen=True)
class ChatTurnRequest:
    """A validated `/chat_stream` body."""

    user_input: str
    regenerate: bool
    overrides: dict[str, Any]
    #: The conversation's system text from this turn on (None: keep what it has).
    system: str | None = None
    #: `user_input` replaces the last user message, whose reply is generated anew (`regenerate`).
    edit: bool = False
    #: Partitions the conversation cache further: only turns with the same salt share prefixes.
    cache_salt: str | None = None


def cache_scope(tenant: tuple[str, str], cache_salt: str | None) -> str:
    """The conversation-cache partition of a request: a digest of who it is for (`("session",
    id)`, `("key", api_key)`, `("address", ip)`) and its `cache_salt`, so that the engine holds
    neither and no two tenants or salts meet."""
    return hashlib.blake2b(json.dumps([*tenant, cache_salt]).encode(), digest_size=16).hexdigest()


def parse_cache_salt(data: dict[str, Any]) -> str | None:
    """A request's optional `cache_salt`: a non-empty string of at most `MAX_CACHE_SALT` characters."""
    salt = data.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise InvalidParameter("cache_salt", f"must be a non-empty string, not {quoted(salt)}")
    if len(salt) > MAX_CACHE_SALT:
        raise InvalidParameter("cache_salt", f"may be at most {MAX_CACHE_SALT} characters, not {len(salt)}")
    return salt


def parse_json_object(body: bytes | str) -> dict[str, Any]:
    """A request body that must be a UTF-8 JSON object; `InvalidJSON` says what is wrong."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidJSON(f"body is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise InvalidJSON(f"body is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise InvalidJSON("body is nested too deeply") from None
    except ValueError as error:  # an integer of more digits than Python converts, or NaN/Infinity
        raise InvalidJSON(f"body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidJSON(f"body must be a JSON object, not {_json_type(data)}")
    try:
        # JSON may spell lone surrogates ("\ud800"), which no tokenizer or encoder can take.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJSON("body contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None
    except RecursionError:
        raise InvalidJSON("body is nested too deeply") from None
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_chat_request(body: bytes | str) -> ChatTurnRequest:
    """Parse and check a `/chat_stream` body (DESIGN §4); raises a 400-class `ChatStreamError`."""
    data = parse_json_object(body)
    if "edit" in data:
        return _parse_edit(data)
    regenerate = data.get("regenerate", False)
    if not isinstance(regenerate, bool):
        raise InvalidRequest(f"'regenerate' must be a boolean, not {_json_type(regenerate)}")
    user_input = data.get("user_input")
    if regenerate and user_input is None:
        user_input = ""
    if not isinstance(user_input, str):
        if user_input is None:
            raise InvalidRequest("'user_input' is required")
        raise InvalidRequest(f"'user_input' must be a string, not {_json_type(user_input)}")
    return ChatTurnRequest(
        user_input=user_input,
        regenerate=regenerate,
        overrides=_overrides(data),
        system=_system(data),
        cache_salt=parse_cache_salt(data),
    )


def _parse_edit(data: dict[str, Any]) -> ChatTurnRequest:
    """`{"edit": text}`: the last user message becomes `text`, and its reply is generated anew."""
    edit = data["edit"]
    if not isinstance(edit, str) or not edit:
        raise InvalidRequest(
            f"'edit' must be the new text of the last message (a non-empty string), not {quoted(edit)}"
        )
    if "user_input" in data or "regenerate" in data:
        raise InvalidRequest("'edit' takes the place of 'user_input' and 'regenerate': send it alone")
    return ChatTurnRequest(
        user_input=edit,
        regenerate=True,
        overrides=_overrides(data),
        system=_system(data),
        edit=True,
        cache_salt=parse_cache_salt(data),
    )


def _overrides(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key in _PARAM_KEYS}


def _system(data: dict[str, Any]) -> str | None:
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRequest(f"'system' must be a string, not {_json_type(system)}")
    return system


def _check_number(
    field: str,
    value: object,
    low: float,
    high: float | None,
    *,
    integer: bool = False,
    open_low: bool = False,
) -> None:
    # bool is an int to Python and never what a client meant.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(field, f"must be a number, not {_json_type(value)}")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise InvalidParameter(field, f"must be an integer, not {quoted(value)}")
    if value != value or (open_low and value <= low) or value < low or (high is not None and value > high):
        low_text = f"> {low}" if open_low else f">= {low}"
        high_text = f" and <= {high}" if high is not None else ""
        raise InvalidParameter(field, f"must be {low_text}{high_text}, not {quoted(value)}")


def _check_stop(field: str, value: object, max_count: int = MAX_STOP_STRINGS) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        raise InvalidParameter(field, "must be a list of non-empty strings")
    if len(value) > max_count:
        raise InvalidParameter(field, f"at most {max_count} stop strings, not {len(value)}")
    if any(len(item) > MAX_STOP_LENGTH for item in value):
        raise InvalidParameter(field, f"a stop string may be at most {MAX_STOP_LENGTH} characters")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
