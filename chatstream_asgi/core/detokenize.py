"""Token ids in, text deltas out: UTF-8 safe, and with stop strings cut out.

A byte-level BPE tokenizer splits one Japanese character or emoji over several tokens, so
decoding token by token would emit U+FFFD halves. `IncrementalDetokenizer` decodes a short
window behind the newest token and holds text back while it ends in an incomplete character;
`StopStringFilter` holds back any tail that could still become a stop string. Both run on the
engine's thread, so no tokenizer call ever lands on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = ..., clean_up_tokenization_spaces: bool = ...
    ) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that concatenate to the full decode."""

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are already emitted

    def add(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the text they complete (maybe empty, never half a character)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if window_text.endswith(_REPLACEMENT) or len(window_text) <= len(prefix_text):
            # An incomplete UTF-8 sequence (or nothing new yet): wait for the next token.
            return ""
        # The emitted tokens stay as decode context: some tokenizers (SentencePiece) drop a
        # leading space when a token is decoded at the start of a sequence.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back, at the end of generation (a truly broken tail included)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )


class StopStringFilter:
    """Passes text through until a stop string appears; never emits any part of one.

    A stop string split across tokens ("<|us" then "er|>") is caught because the tail that
    could start one is held back until it either completes the stop string or stops matching.
    """

    def __init__(self, stop: Iterable[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what is safe to emit. Sets `stopped` once a stop string is seen."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation, the held tail was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        best = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best
