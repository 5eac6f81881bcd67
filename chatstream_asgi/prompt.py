"""Conversation history and how it becomes a model prompt.

`AbstractChatPrompt` keeps ChatStream's method names and its `to_dict` shape, so prompt classes
written for ChatStream (`chat_prompt_clazz`) and histories it stored keep working.
`ChatPrompt` renders with the tokenizer's own chat template, which is what a current model
expects. History lives in one list, `chat_contents`; ChatStream's requester/responder lists are
derived from it instead of being kept in step by hand.
"""

from __future__ import annotations

import copy
import enum
from abc import ABC, abstractmethod
from typing import Any, Protocol, TypeVar

_PromptT = TypeVar("_PromptT", bound="AbstractChatPrompt")


class RoleType(enum.Enum):
    """Who wrote a message."""

    REQUESTER = enum.auto()
    RESPONDER = enum.auto()
    UNKNOWN = enum.auto()


_OPENAI_ROLES = {RoleType.REQUESTER: "user", RoleType.RESPONDER: "assistant"}
_ROLE_TYPES = {"user": RoleType.REQUESTER, "assistant": RoleType.RESPONDER}


class ChatContent:
    """One message of a conversation. `message is None` marks a reply not generated yet."""

    def __init__(
        self,
        role: str,
        msg: str | None = "",
        msg_id: str | None = None,
        role_type: RoleType = RoleType.UNKNOWN,
    ) -> None:
        self.role = role
        self.role_type = role_type
        self.message = msg
        self.message_id = msg_id

    def get_role(self) -> str:
        """The role name (as the prompt class spells it, e.g. "user")."""
        return self.role

    def get_role_type(self) -> RoleType:
        """Requester or responder."""
        return self.role_type

    def get_message(self) -> str | None:
        """The text, or None for a reply still to come."""
        return self.message

    def set_message(self, msg: str | None) -> None:
        """Replace the text."""
        self.message = msg

    def get_message_id(self) -> str | None:
        """The id the reply was streamed under (X-ChatStream-Last-Generated-Message-Id)."""
        return self.message_id

    def set_message_id(self, message_id: str | None) -> None:
        """Set the id of this message."""
        self.message_id = message_id

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, ChatStream's keys."""
        return {
            "role": self.role,
            "role_type": self.role_type.name,
            "message": self.message,
            "message_id": self.message_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatContent:
        """Inverse of `to_dict`."""
        return cls(
            role=str(data["role"]),
            msg=data.get("message"),
            msg_id=data.get("message_id"),
            role_type=RoleType[data.get("role_type", "UNKNOWN")],
        )


class AbstractChatPrompt(ABC):
    """A conversation, with ChatStream's API; subclasses say how it renders (`create_prompt`)."""

    #: Whether tokenizing the rendered prompt should add the tokenizer's special tokens.
    #: A chat template writes its own BOS; hand-written formats usually rely on the tokenizer.
    add_special_tokens: bool = True

    def __init__(self) -> None:
        self.system = ""
        self.requester = ""
        self.responder = ""
        self.chat_mode = True
        self.chat_contents: list[ChatContent] = []
        self.tokenizer: Any = None

    # -- ChatStream's API ------------------------------------------------------------------

    @abstractmethod
    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """The prompt text for the model."""

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:  # noqa: B027
        """Hook run once when a session's prompt is created (set the system text, roles)."""

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Give the prompt the tokenizer it may need to render."""
        self.tokenizer = tokenizer

    def set_system(self, system: str) -> None:
        """Set the system message."""
        self.system = system

    def set_requester(self, requester: str) -> None:
        """Set the role name of the user."""
        self.requester = requester

    def set_responder(self, responder: str) -> None:
        """Set the role name of the assistant."""
        self.responder = responder

    @property
    def requester_messages(self) -> list[ChatContent]:
        """The user's messages, oldest first."""
        return [c for c in self.chat_contents if c.role_type is RoleType.REQUESTER]

    @property
    def responder_messages(self) -> list[ChatContent]:
        """The assistant's messages, oldest first."""
        return [c for c in self.chat_contents if c.role_type is RoleType.RESPONDER]

    def add_requester_msg(self, message: str | None) -> None:
        """Append a user message."""
        self.chat_contents.append(ChatContent(self.requester, message, role_type=RoleType.REQUESTER))

    def add_responder_msg(self, message: str | None) -> None:
        """Append an assistant message (None: the reply about to be generated)."""
        self.chat_contents.append(ChatContent(self.responder, message, role_type=RoleType.RESPONDER))

    def get_requester_last_msg(self) -> str | None:
        """The newest user message, or None."""
        messages = self.requester_messages
        return messages[-1].message if messages else None

    def get_responder_last_msg(self) -> str | None:
        """The newest assistant message, or None."""
        messages = self.responder_messages
        return messages[-1].message if messages else None

    def set_responder_last_msg(self, message: str | None) -> None:
        """Replace the text of the newest assistant message."""
        self._last_responder().set_message(message)

    def set_responder_last_msg_id(self, message_id: str | None) -> None:
        """Set the id of the newest assistant message."""
        self._last_responder().set_message_id(message_id)

    def clear_last_responder_message(self) -> None:
        """Empty the last reply (to None), so it is generated again; no-op if the last message is not one."""
        if self.chat_contents and self.chat_contents[-1].role_type is RoleType.RESPONDER:
            self.chat_contents[-1].set_message(None)

    def has_reply_to_regenerate(self) -> bool:
        """Whether the conversation ends in a reply that `regenerate` could replace."""
        return bool(self.chat_contents) and self.chat_contents[-1].role_type is RoleType.RESPONDER

    def find_chat_content_by_message_id(self, message_id: str) -> ChatContent | None:
        """The message streamed under `message_id`, or None."""
        return next((c for c in self.chat_contents if c.message_id == message_id), None)

    def get_contents(self, opts: dict[str, Any] | None = None) -> list[ChatContent]:
        """The history; `{"to_message_id": id}` stops at that message (ChatStream's option)."""
        to_message_id = (opts or {}).get("to_message_id")
        contents: list[ChatContent] = []
        for content in self.chat_contents:
            contents.append(content)
            if to_message_id is not None and content.message_id == to_message_id:
                break
        return contents

    def get_turn(self) -> int:
        """Number of user messages so far."""
        return len(self.requester_messages)

    def is_empty(self) -> bool:
        """True before the first message."""
        return not self.chat_contents

    def clear_history(self) -> None:
        """Forget every message (the system text stays)."""
        self.chat_contents = []

    def to_messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages (roles user/assistant/system); a reply still
        to come is left out. What remote engines send, whatever this class's own format."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for content in self.chat_contents:
            if content.message is None:
                continue
            role = _OPENAI_ROLES.get(content.role_type) or content.role
            messages.append({"role": role, "content": content.message})
        return messages

    def get_stop_strs(self) -> list[str] | None:
        """Stop strings this prompt format needs (override in a subclass); None for none."""
        return None

    # -- history maintenance ---------------------------------------------------------------

    def drop_oldest_turn(self) -> bool:
        """Remove the oldest user message and the replies after it, never the newest request.

        Returns False when nothing more can go. Used to fit a long history into the context.
        """
        starts = [i for i, c in enumerate(self.chat_contents) if c.role_type is RoleType.REQUESTER]
        if len(starts) < 2:
            return False
        del self.chat_contents[: starts[1]]
        return True

    def clone(self: _PromptT) -> _PromptT:
        """An independent copy (the tokenizer is shared, not copied)."""
        tokenizer, self.tokenizer = self.tokenizer, None
        try:
            twin = copy.deepcopy(self)
        finally:
            self.tokenizer = tokenizer
        twin.tokenizer = tokenizer
        return twin

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form in ChatStream's shape."""
        return {
            "system": self.system,
            "chat_contents": [c.to_dict() for c in self.chat_contents],
            "responder_messages": [c.to_dict() for c in self.responder_messages],
            "requester_messages": [c.to_dict() for c in self.requester_messages],
            "requester": self.requester,
            "responder": self.responder,
            "chat_mode": self.chat_mode,
        }

    @classmethod
    def from_dict(cls: type[_PromptT], data: dict[str, Any]) -> _PromptT:
        """Inverse of `to_dict`; the caller sets the tokenizer."""
        prompt = cls()
        prompt.system = data.get("system", "")
        prompt.requester = data.get("requester", "")
        prompt.responder = data.get("responder", "")
        prompt.chat_mode = data.get("chat_mode", True)
        prompt.chat_contents = [ChatContent.from_dict(c) for c in data.get("chat_contents", [])]
        return prompt

    def _last_responder(self) -> ChatContent:
        for content in reversed(self.chat_contents):
            if content.role_type is RoleType.RESPONDER:
                return content
        raise ValueError("the conversation has no assistant message yet")


class ChatPrompt(AbstractChatPrompt):
    """A conversation rendered with the tokenizer's chat template (`apply_chat_template`).

    Without a tokenizer (remote and mock engines) it renders a plain `<|role|>text` transcript,
    so callbacks that print `create_prompt()` still show the conversation.
    """

    add_special_tokens = False

    def __init__(self) -> None:
        super().__init__()
        self.requester = "user"
        self.responder = "assistant"

    @classmethod
    def from_messages(cls, messages: list[dict[str, str]]) -> ChatPrompt:
        """A conversation from OpenAI-style messages, its reply pending (the `/v1` request form).

        Leading system messages become the system text; the rest keep their roles.
        """
        prompt = cls()
        rest = list(messages)
        systems = []
        while rest and rest[0]["role"] == "system":
            systems.append(rest.pop(0)["content"])
        prompt.system = "\n\n".join(systems)
        for message in rest:
            role_type = _ROLE_TYPES.get(message["role"], RoleType.UNKNOWN)
            prompt.chat_contents.append(ChatContent(message["role"], message["content"], role_type=role_type))
        prompt.add_responder_msg(None)
        return prompt

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """Render with the chat template; ends with the assistant's cue while a reply is pending."""
        contents = self.get_contents(opts)
        pending = bool(contents) and contents[-1].message is None
        twin = copy.copy(self)
        twin.chat_contents = contents
        if self.tokenizer is None:
            transcript = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in twin.to_messages())
            return transcript + ("<|assistant|>" if pending else "")
        rendered: str = self.tokenizer.apply_chat_template(
            twin.to_messages(), tokenize=False, add_generation_prompt=pending
        )
        return rendered


class _CountsTokens(Protocol):
    def __call__(self, text: str) -> int: ...


def fit_prompt(prompt: AbstractChatPrompt, count_tokens: _CountsTokens, budget: int) -> str:
    """Render `prompt` (a copy the caller owns), dropping oldest turns until it fits `budget` tokens.

    The newest request always stays; if it alone is too long, the caller cuts tokens from the left.
    """
    text = prompt.create_prompt()
    while count_tokens(text) > budget and prompt.drop_oldest_turn():
        text = prompt.create_prompt()
    return text
