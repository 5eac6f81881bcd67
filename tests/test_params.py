"""Generation parameters and `/chat_stream` bodies are validated before anything is admitted."""

from __future__ import annotations

import pytest

from chatstream_asgi.core.params import GenerationParams, parse_chat_request
from chatstream_asgi.errors import InvalidJSON, InvalidParameter, InvalidRequest


def test_chatstream_key_names_and_aliases_set_the_same_fields() -> None:
    base = GenerationParams()
    a = base.with_overrides({"top_k_value": 5, "top_p_value": 0.5}, max_new_tokens_limit=256)
    b = base.with_overrides({"top_k": 5, "top_p": 0.5}, max_new_tokens_limit=256)
    assert (a.top_k, a.top_p) == (b.top_k, b.top_p) == (5, 0.5)


def test_integer_temperature_is_cast_to_float_and_zero_means_greedy() -> None:
    params = GenerationParams().with_overrides({"temperature": 0}, max_new_tokens_limit=256)
    assert params.temperature == 0.0 and isinstance(params.temperature, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_k_value", 501),
        ("top_k", 1.5),
        ("top_p_value", 0),
        ("top_p", 1.01),
        ("max_new_tokens", 0),
        ("max_new_tokens", 257),
        ("stop", "x"),
        ("stop", [""]),
    ],
)
def test_out_of_range_or_mistyped_parameter_is_refused_naming_the_field(key: str, value: object) -> None:
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams().with_overrides({key: value}, max_new_tokens_limit=256)
    assert caught.value.field == key
    assert caught.value.status_code == 422


def test_request_stop_strings_add_to_the_servers() -> None:
    params = GenerationParams(stop=("###",)).with_overrides({"stop": ["END"]}, max_new_tokens_limit=256)
    assert params.stop == ("###", "END")


def test_valid_body_parses_into_a_turn() -> None:
    turn = parse_chat_request(b'{"user_input": "hi", "temperature": 0.2, "unrelated": 1}')
    assert turn.user_input == "hi" and not turn.regenerate
    assert turn.overrides == {"temperature": 0.2}


def test_regenerate_needs_no_user_input() -> None:
    assert parse_chat_request('{"regenerate": true}').regenerate


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"\xff\xfe", InvalidJSON),
        (b"{not json", InvalidJSON),
        (b"[1, 2]", InvalidJSON),
        (b'"text"', InvalidJSON),
        (b"{}", InvalidRequest),
        (b'{"user_input": 3}', InvalidRequest),
        (b'{"user_input": null}', InvalidRequest),
        (b'{"user_input": "x", "regenerate": "yes"}', InvalidRequest),
    ],
)
def test_malformed_body_is_refused_with_its_code(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_chat_request(body)
