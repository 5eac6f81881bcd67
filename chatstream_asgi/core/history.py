"""What a turn leaves in its conversation: the one copy of the history rules every front-end uses.

A turn adds the user's message and an empty reply (or, to regenerate, empties the last reply,
and for an edit puts `user_input` in place of the last user message first), with the system
text the turn brings, if any; then it records the reply as it is generated, so a reply stopped
half-way keeps what was shown.
A turn that failed, or showed nothing before its client left, leaves the conversation as it was.
A prompt class with `strip_reply` keeps the reply stripped of surrounding whitespace, and outside
chat mode the model continues the user's text, so the reply (as ChatStream gives it) is that text
followed by its continuation. The `/chat_stream` turn and the console chat both run through
`TurnHistory`, so a conversation reads the same whichever front-end it was held in.
"""

from __future__ import annotations

from chatstream_asgi.core.prompt import AbstractChatPrompt


class TurnHistory:
    """One turn's effect on its conversation `prompt` (see the module docstring)."""

    def __init__(
        self,
        prompt: AbstractChatPrompt,
        *,
        user_input: str,
        regenerate: bool,
        message_id: str | None = None,
        edit: bool = False,
        system: str | None = None,
    ) -> None:
        #: The conversation as it was, for a turn that fails or never shows its client anything.
        self.before = prompt.clone()
        self.prompt = prompt
        if system is not None:
            prompt.set_system(system)
        if regenerate:
            prompt.clear_last_responder_message()
            if edit:
                prompt.set_requester_last_msg(user_input)
        else:
            prompt.add_requester_msg(user_input)
            prompt.add_responder_msg(None)
        if message_id is not None:
            prompt.set_responder_last_msg_id(message_id)
        #: The reply so far, as the model wrote it (with the echo outside chat mode).
        self.reply = ""
        self._strip = prompt.strip_reply
        self._echo = "" if prompt.is_chat_mode_enabled() else prompt.create_prompt()

    def model_input(self) -> AbstractChatPrompt:
        """The conversation to generate from (a copy: the engine renders it on its own thread)."""
        return self.prompt.clone()

    @property
    def echo_pending(self) -> bool:
        """Whether the echo of the user's text (outside chat mode) has yet to be shown."""
        return bool(self._echo)

    def add(self, text: str) -> str:
        """Record newly generated `text`; returns what the client is to see (the echo first)."""
        text, self._echo = self._echo + text, ""
        self.reply += text
        self.prompt.set_responder_last_msg(self.reply.strip() if self._strip else self.reply)
        return text

    def conversation_after(self, *, shown: bool, failed: bool) -> AbstractChatPrompt:
        """The conversation the turn leaves: with its reply, unless it failed or nothing was shown."""
        return self.before if failed or not shown else self.prompt
