"""What every bundled preset shares: chat mode renders the history, completion mode the newest text."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from chatstream_asgi.core.prompt import AbstractChatPrompt, ChatContent


class PresetChatPrompt(AbstractChatPrompt):
    """A preset renders `head()` and then each message of `get_contents` (`render`).

    Outside chat mode its prompt is the newest user text as is, as in ChatStream's presets.
    """

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """The prompt text for the model."""
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        return self.head() + "".join(self.render(content) for content in self.get_contents(opts))

    def head(self) -> str:
        """What comes before the first message: the system text."""
        return self.system

    @abstractmethod
    def render(self, content: ChatContent) -> str:
        """One message (its `message` None or empty: the cue for that role's turn)."""
