"""Incremental detokenization never emits half a character, and stop strings never leak."""

from __future__ import annotations

from typing import Any

import pytest

from chatstream_asgi.core.detokenize import IncrementalDetokenizer, StopStringFilter

TEXTS = [
    "Hello, world! How are you?",
    "日本語のテキストを少しずつ流します。",
    "emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "mixed 日本 and 😀 text, ending in 漢字",
]


def _stream(tokenizer: Any, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add([token]) for token in ids]
    return [*pieces, detokenizer.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_really_split_across_tokens(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The test below could not fail if every character had a token of its own.
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids) or text.isascii()


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_contains_a_broken_character(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for piece in _stream(tokenizer, ids):
        assert "\ufffd" not in piece


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids) == text


def test_random_token_sequence_concatenates_to_the_full_decode(tokenizer: Any) -> None:
    import random

    rng = random.Random(7)
    ids = [rng.randrange(len(tokenizer)) for _ in range(400)]
    expected = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(_stream(tokenizer, ids)) == expected


def test_stop_string_is_cut_and_nothing_after_it_is_emitted() -> None:
    stop = StopStringFilter(["END"])
    out = stop.feed("hello EN") + stop.feed("D and more") + stop.feed("ignored")
    assert out == "hello "
    assert stop.stopped
    assert stop.flush() == ""


def test_stop_string_split_across_many_pieces_is_caught() -> None:
    stop = StopStringFilter(["<|user|>"])
    out = "".join(stop.feed(piece) for piece in ["Sure", "!", "<", "|", "us", "er", "|>", "more"])
    assert out == "Sure!"
    assert stop.stopped


def test_a_prefix_of_a_stop_string_that_does_not_complete_is_released() -> None:
    stop = StopStringFilter(["<|user|>"])
    out = stop.feed("a <|u") + stop.feed("nicorn")
    assert out == "a <|unicorn"
    assert not stop.stopped


def test_held_prefix_is_released_at_the_end() -> None:
    stop = StopStringFilter(["STOP"])
    assert stop.feed("so ST") == "so "
    assert stop.flush() == "ST"


def test_earliest_of_several_stop_strings_wins() -> None:
    stop = StopStringFilter(["world", "lo"])
    assert stop.feed("hello world") == "hel"
