"""The reply as a prompt class wants it shown: ChatStream's trimming and output replacements, streamed.

ChatStream shows `replace(reply.strip())` (its `get_replacement_when_output` pairs, e.g. Rinna's
`("<NL>", "\\n")`) and keeps `reply.strip()` in the history, in the model's own spelling, so the
next prompt renders as the model wrote it. `ReplyShaper` does the same to text that arrives in
pieces: it runs on the loop after the engine's detokenizer and stop-string filter, holds back
only what may still change (trailing whitespace, a tail that may begin a replaced text), and
its pieces always concatenate to exactly `prompt.replace_string(reply.strip(), pairs)`.
Replacement is pair by pair like ChatStream's input replacement; its output-side TokFlow
matches all pairs at once, which differs only for pairs that overlap or feed each other.
A prompt class that neither strips nor replaces (`ChatPrompt`) gets no shaper: no cost per token.
"""

from __future__ import annotations

from chatstream_asgi.core.prompt import AbstractChatPrompt


class _StreamReplace:
    """`str.replace(old, new)` over text that arrives in pieces."""

    def __init__(self, old: str, new: str) -> None:
        self._old = old
        self._new = new
        self._held = ""

    def feed(self, text: str) -> str:
        """Replace what is certain; hold back a tail that may still grow into `old`."""
        buffer = self._held + text
        out: list[str] = []
        start = 0
        while (found := buffer.find(self._old, start)) >= 0:  # leftmost, non-overlapping: as str.replace
            out += (buffer[start:found], self._new)
            start = found + len(self._old)
        rest = buffer[start:]
        keep = next((n for n in range(min(len(self._old) - 1, len(rest)), 0, -1) if rest.endswith(self._old[:n])), 0)
        self._held = rest[len(rest) - keep :]
        out.append(rest[: len(rest) - keep])
        return "".join(out)

    def flush(self) -> str:
        """The held-back tail: the text has ended, so it can no longer become `old`."""
        held, self._held = self._held, ""
        return held


class ReplyShaper:
    """Streams `replace(reply.strip())` for one reply (see the module docstring)."""

    def __init__(self, *, strip: bool, replacements: list[tuple[str, str]]) -> None:
        self._strip = strip
        self._started = not strip  # leading whitespace is dropped until the first other character
        self._spaces = ""  # trailing whitespace, shown only once more text follows it
        self._stages = [_StreamReplace(old, new) for old, new in replacements if old]

    @classmethod
    def for_prompt(cls, prompt: AbstractChatPrompt) -> ReplyShaper | None:
        """The shaper `prompt`'s class asks for, or None when the text passes unchanged."""
        replacements = list(prompt.get_replacement_when_output() or [])
        if not prompt.strip_reply and not any(old for old, _ in replacements):
            return None
        return cls(strip=prompt.strip_reply, replacements=replacements)

    def feed(self, text: str) -> str:
        """The shown text that `text` completes (maybe empty)."""
        if self._strip:
            if not self._started:
                text = text.lstrip()
                self._started = bool(text)
            body = (self._spaces + text).rstrip()
            self._spaces = (self._spaces + text)[len(body) :]
            text = body
        for stage in self._stages:
            text = stage.feed(text)
        return text

    def flush(self) -> str:
        """What is still held back once the reply has ended (trailing whitespace stays dropped)."""
        text = ""
        for stage in self._stages:
            text = stage.feed(text) + stage.flush()
        return text
