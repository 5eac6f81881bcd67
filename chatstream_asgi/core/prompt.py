"""Conversation history and how it becomes a model prompt.

`AbstractChatPrompt` is ChatStream 0.3.0's prompt API, method for method, with its `to_dict`
shape, so prompt classes written for ChatStream (`chat_prompt_clazz`) and histories it stored
keep working: input replacements applied as a user message is added, output replacements and
stop strings declared by the class (the engines and `chatstream_asgi.core.reply` apply them), prompt
TTL, chat mode, skip lengths. `ChatPrompt` renders with the tokenizer's own chat template,
which is what a current model expects.

Where we differ from ChatStream on purpose: which message is the last reply or request is read
from its role type, not its role name (ChatStream's presets with empty role names, Llama 2 and
OpenCALM, confuse the two); `requester_messages` / `responder_messages` hold the very objects of
`chat_contents`, also after `from_dict`, so the three lists cannot drift apart.
"""

from __future__ import annotations

import copy
import enum
from abc import ABC, abstractmethod
from typing import Any, Protocol, TypeVar

_PromptT = TypeVar("_PromptT", bound="AbstractChatPrompt")

#: ChatStream's replacement rules: `(old, new)` pairs, applied in order.
Replacements = list[tuple[str, str]]


class RoleType(enum.Enum):
    """Who wrote a message."""

    REQUESTER = enum.auto()
    RESPONDER = enum.auto()
    UNKNOWN = enum.auto()


class PromptTTL(enum.Enum):
    """How much of the history a prompt renders (ChatStream's `PromptTTL`)."""

    MULTI_TURN = enum.auto()  # the whole conversation
    SINGLE_TURN = enum.auto()  # only the newest exchange: each turn stands alone


_OPENAI_ROLES = {RoleType.REQUESTER: "user", RoleType.RESPONDER: "assistant"}
_ROLE_TYPES = {"user": RoleType.REQUESTER, "assistant": RoleType.RESPONDER}


class ChatContent:
    """One message of a conversation. `message is None` marks a reply not generated yet.

    `child_messages` are extra texts attached to a user message (ChatStream's "input" of an
    instruction, rendered by the Stability AI and Matsuo Lab presets).
    """

    def __init__(
        self,
        role: str,
        msg: str | None = "",
        msg_id: str | None = None,
        role_type: RoleType = RoleType.UNKNOWN,
        child_msgs: list[str] | None = None,
    ) -> None:
        self.role = role
        self.role_type = role_type
        self.message = msg
        self.message_id = msg_id
        self.child_messages = child_msgs

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

    def add_child_message(self, msg: str) -> None:
        """Attach one more child text."""
        if self.child_messages is None:
            self.child_messages = []
        self.child_messages.append(msg)

    def get_child_messages(self) -> list[str] | None:
        """The attached child texts, or None."""
        return self.child_messages

    def has_child_messages(self) -> bool:
        """Whether at least one child text is attached."""
        return bool(self.child_messages)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, ChatStream's keys."""
        return {
            "role": self.role,
            "role_type": self.role_type.name,
            "message": self.message,
            "message_id": self.message_id,
            "child_messages": self.child_messages,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatContent:
        """Inverse of `to_dict`; also reads dicts stored before `child_messages` existed."""
        return cls(
            role=str(data["role"]),
            msg=data.get("message"),
            msg_id=data.get("message_id"),
            role_type=RoleType[data.get("role_type", "UNKNOWN")],
            child_msgs=data.get("child_messages"),
        )


class AbstractChatPrompt(ABC):
    """A conversation, with ChatStream's API; subclasses say how it renders (`create_prompt`)."""

    #: Whether tokenizing the rendered prompt should add the tokenizer's special tokens.
    #: A chat template writes its own BOS; hand-written formats usually rely on the tokenizer.
    add_special_tokens: bool = True
    #: Whether the reply loses its leading and trailing whitespace, in the stream and in the
    #: history, as ChatStream does: "<bot>:" is followed by " Hello", kept as "Hello", so the
    #: next prompt renders "<bot>: Hello" once, not with two spaces.
    strip_reply: bool = True

    def __init__(self) -> None:
        self.system = ""
        self.chat_contents: list[ChatContent] = []
        self.responder_messages: list[ChatContent] = []
        self.requester_messages: list[ChatContent] = []
        self.requester = ""
        self.responder = ""
        self.chat_mode = True
        self.special_tokens: list[Any] | None = None
        self.prefix_as_stop_str_enabled = False
        #: ChatStream's name; it holds the text that starts a *user* turn (e.g. "<human>:").
        self.responder_prefix_as_stop_str: str | None = None
        self.final_stop_strs: list[str] | None = None
        self.prompt_ttl_mode = PromptTTL.MULTI_TURN
        self.tokenizer: Any = None

    # -- what a prompt class implements ----------------------------------------------------

    @abstractmethod
    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """The prompt text for the model; `opts` as in `get_contents`."""

    def build_initial_prompt(self, chat_prompt: AbstractChatPrompt) -> None:  # noqa: B027
        """Hook run once when a session's prompt is created (set the system text, a few-shot start)."""

    def get_stop_strs(self) -> list[str] | None:
        """Stop strings this prompt format needs (override in a subclass); None for none."""
        return None

    def get_replacement_when_input(self) -> Replacements | None:
        """`(old, new)` pairs applied to each user message as it is added (e.g. `("\\n", "<NL>")`)."""
        return None

    def get_replacement_when_output(self) -> Replacements | None:
        """`(old, new)` pairs applied to the generated text on its way to the client
        (e.g. `("<NL>", "\\n")`); the history keeps the model's own text, as ChatStream does."""
        return None

    def get_custom_skip_echo_len(self, skip_echo_len: int) -> int:
        """Adjust `get_skip_len` for a model whose decode differs from its prompt (ChatStream's hook)."""
        return skip_echo_len

    # -- settings ----------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Give the prompt the tokenizer it may need to render (and its special tokens)."""
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.special_tokens = list(tokenizer.special_tokens_map.values())

    def set_system(self, system: str) -> None:
        """Set the system message."""
        self.system = system

    def set_requester(self, requester: str) -> None:
        """Set the role name of the user."""
        self.requester = requester

    def set_responder(self, responder: str) -> None:
        """Set the role name of the assistant."""
        self.responder = responder

    def set_chat_mode_enabled(self, enabled: bool) -> None:
        """Chat mode (default) renders the conversation; off, the prompt is the newest user text
        as is (the presets' completion mode) and the class's stop strings are not used."""
        self.chat_mode = enabled

    def is_chat_mode_enabled(self) -> bool:
        """Whether chat mode is on."""
        return self.chat_mode

    def set_prompt_ttl(self, prompt_ttl: PromptTTL) -> None:
        """`PromptTTL.SINGLE_TURN` renders only the newest exchange; `MULTI_TURN` (default) all of it."""
        self.prompt_ttl_mode = prompt_ttl

    def set_prefix_as_stop_str_enabled(self, enabled: bool) -> None:
        """Also stop generation where the model starts a user turn of its own.

        The text that opens a user turn is found by rendering an empty conversation and one with
        a pending user message; the difference (e.g. "<human>:") becomes a stop string. For
        models that do not stop reliably at EOS. Clears the history, as ChatStream does.
        """
        self.prefix_as_stop_str_enabled = enabled
        if not enabled:
            return
        self.clear_history()
        before = self.create_prompt()
        self.add_requester_msg(None)
        after = self.create_prompt()
        self.clear_history()
        prefix = after[len(before) :] if after.startswith(before) else after
        if not prefix:
            raise ValueError(
                "a pending user message renders as nothing: call set_requester (and set_responder) "
                "before set_prefix_as_stop_str_enabled, so that create_prompt can show the user's turn"
            )
        self.responder_prefix_as_stop_str = prefix

    # -- history -----------------------------------------------------------------------------

    def add_requester_msg(
        self, message: str | None, child_message: str | None = None, child_messages: list[str] | None = None
    ) -> None:
        """Append a user message (input replacements applied), with at most one of `child_message`
        or `child_messages` (a non-empty list of strings) attached."""
        if child_message is not None and child_messages is not None:
            raise ValueError("pass child_message or child_messages, not both")
        children: list[str] | None = None
        if child_message is not None:
            children = [child_message]
        elif child_messages is not None:
            if not isinstance(child_messages, list) or not child_messages:
                raise ValueError("child_messages must be a non-empty list of strings")
            if not all(isinstance(item, str) for item in child_messages):
                raise ValueError("child_messages must be a non-empty list of strings")
            children = list(child_messages)
        self._add_msg(ChatContent(self.requester, message, role_type=RoleType.REQUESTER, child_msgs=children))

    def add_responder_msg(self, message: str | None) -> None:
        """Append an assistant message (None: the reply about to be generated)."""
        self._add_msg(ChatContent(self.responder, message, role_type=RoleType.RESPONDER))

    def _add_msg(self, chat_content: ChatContent) -> None:
        """Append a message; a user's text gets the input replacements first (ChatStream's place)."""
        if chat_content.role_type is RoleType.REQUESTER and chat_content.message is not None:
            chat_content.set_message(self.replace_string(chat_content.message, self.get_replacement_when_input()))
        self._append(chat_content)

    def _append(self, chat_content: ChatContent) -> None:
        """Append a message as it is, keeping the requester/responder lists in step."""
        self.chat_contents.append(chat_content)
        if chat_content.role_type is RoleType.REQUESTER:
            self.requester_messages.append(chat_content)
        elif chat_content.role_type is RoleType.RESPONDER:
            self.responder_messages.append(chat_content)

    def get_requester_last_msg(self) -> str | None:
        """The newest user message, or None."""
        return self.requester_messages[-1].message if self.requester_messages else None

    def get_responder_last_msg(self) -> str | None:
        """The newest assistant message, or None."""
        return self.responder_messages[-1].message if self.responder_messages else None

    def set_requester_last_msg(self, message: str) -> None:
        """Replace the text of the newest user message (input replacements applied), as an edit."""
        if not self.requester_messages:
            raise ValueError("the conversation has no user message yet")
        self.requester_messages[-1].set_message(self.replace_string(message, self.get_replacement_when_input()))

    def set_responder_last_msg(self, message: str | None) -> None:
        """Replace the text of the newest assistant message."""
        self._last_responder().set_message(message)

    def set_responder_last_msg_id(self, message_id: str | None) -> None:
        """Set the id of the newest assistant message."""
        self._last_responder().set_message_id(message_id)

    def clear_last_responder_message(self) -> None:
        """Empty the last reply (to None), so it is generated again; no-op if the last message is not one."""
        if self.has_reply_to_regenerate():
            self.chat_contents[-1].set_message(None)

    def remove_last_requester_msg(self) -> None:
        """Remove the newest message, which must be the user's."""
        self._remove_last(RoleType.REQUESTER, self.requester_messages)

    def remove_last_responder_msg(self) -> None:
        """Remove the newest message, which must be the assistant's."""
        self._remove_last(RoleType.RESPONDER, self.responder_messages)

    def clear_history(self) -> None:
        """Forget every message (the system text stays)."""
        self.chat_contents = []
        self.responder_messages = []
        self.requester_messages = []

    # -- reading -----------------------------------------------------------------------------

    def get_contents(self, opts: dict[str, Any] | None = None) -> list[ChatContent]:
        """The history to render.

        `opts`: `"omit_last_message": True` turns the newest message into a pending one (its role
        only); `"to_message_id": id` stops at that message. With `PromptTTL.SINGLE_TURN` only the
        last two messages remain, unless the history was cut at `to_message_id` (as in ChatStream).
        """
        opts = opts or {}
        omit_last_message = opts.get("omit_last_message", False)
        to_message_id = opts.get("to_message_id")
        contents: list[ChatContent] = []
        for index, content in enumerate(self.chat_contents):
            if omit_last_message and index == len(self.chat_contents) - 1:
                contents.append(ChatContent(content.role, None, role_type=content.role_type))
            else:
                contents.append(content)
            if to_message_id is not None and content.message_id == to_message_id:
                return contents
        if self.prompt_ttl_mode is PromptTTL.SINGLE_TURN and len(contents) >= 2:
            contents = contents[-2:]
        return contents

    def find_chat_content_by_message_id(self, message_id: str) -> ChatContent | None:
        """The message streamed under `message_id`, or None."""
        return next((c for c in self.chat_contents if c.message_id is not None and c.message_id == message_id), None)

    def get_turn(self) -> int:
        """Number of user messages so far."""
        return len(self.requester_messages)

    def is_empty(self) -> bool:
        """True before the first message."""
        return not self.requester_messages and not self.responder_messages

    def is_requester_role(self, role: str) -> bool:
        """Whether `role` is the user's role name."""
        return role == self.requester

    def has_reply_to_regenerate(self) -> bool:
        """Whether the conversation ends in a reply that `regenerate` could replace."""
        return bool(self.chat_contents) and self.chat_contents[-1].role_type is RoleType.RESPONDER

    def get_skip_len(self, omit_last_message: bool = False) -> int:
        """Characters of the rendered prompt, special tokens left out: where ChatStream's engine
        cut its decode of prompt + reply. Kept for prompt classes that use it; our engines decode
        only the new tokens."""
        text = self.create_prompt({"omit_last_message": omit_last_message})
        for token in self.special_tokens or []:
            for piece in token if isinstance(token, list) else [token]:
                if isinstance(piece, str):
                    text = text.replace(piece, "")
        return self.get_custom_skip_echo_len(len(text))

    def replace_string(self, original_string: str, replace_list: Replacements | None) -> str:
        """`original_string` with each `(old, new)` pair of `replace_list` replaced, pair by pair.

        A pair with an empty `old` is skipped: "replace nothing" has no sensible meaning.
        """
        for old, new in replace_list or []:
            if old:
                original_string = original_string.replace(old, new)
        return original_string

    def _get_final_stop_strs(self) -> list[str]:
        """ChatStream's stop strings of this class: the user-turn prefix (when enabled) and then
        `get_stop_strs()`. Kept once non-empty, as in ChatStream."""
        if not self.final_stop_strs:
            final: list[str] = []
            if self.prefix_as_stop_str_enabled and self.responder_prefix_as_stop_str:
                final.append(self.responder_prefix_as_stop_str)
            declared = self.get_stop_strs()
            if isinstance(declared, list):
                final += declared
            self.final_stop_strs = final
        return self.final_stop_strs

    def generation_stop_strs(self) -> list[str]:
        """The stop strings every engine applies for this prompt: ChatStream's final stop strings
        in chat mode, none outside it."""
        return [s for s in self._get_final_stop_strs() if s] if self.is_chat_mode_enabled() else []

    def to_messages(self, opts: dict[str, Any] | None = None) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages (roles user/assistant/system); a reply still
        to come is left out. What remote engines send, whatever this class's own format."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for content in self.get_contents(opts):
            if content.message is None:
                continue
            role = _OPENAI_ROLES.get(content.role_type) or content.role
            messages.append({"role": role, "content": content.message})
        return messages

    # -- history maintenance ---------------------------------------------------------------

    def drop_oldest_turn(self) -> bool:
        """Remove the oldest user message and the replies after it, never the newest request.

        Returns False when nothing more can go. Used to fit a long history into the context.
        """
        starts = [i for i, c in enumerate(self.chat_contents) if c.role_type is RoleType.REQUESTER]
        if len(starts) < 2:
            return False
        del self.chat_contents[: starts[1]]
        self.requester_messages[:] = [c for c in self.chat_contents if c.role_type is RoleType.REQUESTER]
        self.responder_messages[:] = [c for c in self.chat_contents if c.role_type is RoleType.RESPONDER]
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
        """Inverse of `to_dict` (ChatStream's and ours); the caller sets the tokenizer.

        The requester/responder lists are rebuilt from `chat_contents`, as the same objects.
        """
        prompt = cls()
        prompt.system = data.get("system", "")
        prompt.requester = data.get("requester", "")
        prompt.responder = data.get("responder", "")
        prompt.chat_mode = data.get("chat_mode", True)
        prompt.clear_history()
        for content in data.get("chat_contents", []):
            prompt._append(ChatContent.from_dict(content))
        return prompt

    def _last_responder(self) -> ChatContent:
        if not self.responder_messages:
            raise ValueError("the conversation has no assistant message yet")
        return self.responder_messages[-1]

    def _remove_last(self, role_type: RoleType, messages: list[ChatContent]) -> None:
        if not self.chat_contents or self.chat_contents[-1].role_type is not role_type:
            who = "user" if role_type is RoleType.REQUESTER else "assistant"
            raise ValueError(f"the newest message must be the {who}'s")
        messages.remove(self.chat_contents.pop())


class ChatPrompt(AbstractChatPrompt):
    """A conversation rendered with the tokenizer's chat template (`apply_chat_template`).

    Without a tokenizer (remote and mock engines) it renders a plain `<|role|>text` transcript,
    so callbacks that print `create_prompt()` still show the conversation. The reply is kept as
    generated (`strip_reply = False`): a chat template decides its own whitespace.
    """

    add_special_tokens = False
    strip_reply = False

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
            prompt._append(ChatContent(message["role"], message["content"], role_type=role_type))
        prompt.add_responder_msg(None)
        return prompt

    def create_prompt(self, opts: dict[str, Any] | None = None) -> str:
        """Render with the chat template; ends with the assistant's cue while a reply is pending.

        Outside chat mode the prompt is the newest user message as is."""
        if not self.chat_mode:
            return self.get_requester_last_msg() or ""
        contents = self.get_contents(opts)
        pending = bool(contents) and contents[-1].message is None
        messages = self.to_messages(opts)
        if self.tokenizer is None:
            transcript = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
            return transcript + ("<|assistant|>" if pending else "")
        rendered: str = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=pending)
        return rendered


class _CountsTokens(Protocol):
    def __call__(self, text: str) -> int: ...


def fit_prompt(prompt: AbstractChatPrompt, count_tokens: _CountsTokens, budget: int) -> str:
    """Render `prompt` (a copy the caller owns), keeping only the newest turns that fit `budget` tokens.

    It walks back from the newest turn, counting each older message's tokens once, and stops at
    the first turn that does not fit: about one context of tokenizer work per turn however long
    the history, where rendering the whole history once per dropped turn grew with its square.
    The template's own tokens per message are estimated from the newest turn, rendered alone; a
    final render checks the estimate (and drops one more turn if it was short). The newest
    request always stays; if it alone is too long, the caller cuts tokens from the left.
    """
    history = list(prompt.chat_contents)
    starts = [i for i, c in enumerate(history) if c.role_type is RoleType.REQUESTER]
    if len(starts) < 2:
        return prompt.create_prompt()
    _keep_from(prompt, history, starts[-1])
    text = prompt.create_prompt()
    used: float = count_tokens(text)
    newest = history[starts[-1] :]
    content_tokens = sum(count_tokens(c.message or "") for c in newest)
    per_message = max(0, used - content_tokens) / len(newest)  # an over-estimate: it holds the system text too
    keep = len(starts) - 1
    while keep > 0 and used <= budget:
        turn = history[starts[keep - 1] : starts[keep]]
        cost = sum(count_tokens(c.message or "") + per_message for c in turn)
        if used + cost > budget:
            break
        used += cost
        keep -= 1
    if keep == len(starts) - 1:
        return text
    _keep_from(prompt, history, starts[keep])
    text = prompt.create_prompt()
    while count_tokens(text) > budget and prompt.drop_oldest_turn():
        text = prompt.create_prompt()
    return text


def _keep_from(prompt: AbstractChatPrompt, history: list[ChatContent], start: int) -> None:
    """Make `prompt`'s conversation `history[start:]`."""
    prompt.chat_contents = history[start:]
    prompt.requester_messages = [c for c in prompt.chat_contents if c.role_type is RoleType.REQUESTER]
    prompt.responder_messages = [c for c in prompt.chat_contents if c.role_type is RoleType.RESPONDER]


def keep_newest_text(prompt: AbstractChatPrompt, tokens: int, longest_token: int) -> None:
    """Cut `prompt` (a copy the caller owns) to what its newest `tokens` tokens can hold: at most
    `tokens * longest_token` characters of text, in at most `tokens` messages.

    Walking back from the newest message, messages are kept whole while they fit; the one that
    crosses the character allowance keeps its end (a new `ChatContent`: the caller's history is
    not touched) and older ones go. The system text, rendered with whichever turns stay, keeps
    its newest characters. This bounds what rendering and tokenizing cost before either runs: a
    token covers at most as many characters as the tokenizer's longest token string, and a
    message renders as at least one token (its role's marker, in a chat template and in
    ChatPrompt's formats alike), so a megabyte of text, or thirty thousand empty messages, is
    cut to one context's worth. What is cut could never have reached the model: `fit_prompt`
    then drops the same turns and keeps the same newest tokens.
    """
    allowance = tokens * longest_token
    left = allowance
    kept: list[ChatContent] = []
    cut = False
    for content in reversed(prompt.chat_contents):
        if cut:
            break
        if len(kept) == tokens:  # each renders as a token at least: older ones cannot reach the model
            cut = True
            break
        parts = [content.message or "", *(content.child_messages or [])]
        size = sum(len(part) for part in parts)
        if size <= left:
            kept.append(content)
            left -= size
            continue
        cut = True
        tails = []
        for part in reversed(parts):  # the child messages render after the message
            tails.append(part[len(part) - min(len(part), left) :])
            left -= len(tails[-1])
        tails.reverse()
        message = tails[0] if content.message is not None else None
        children = tails[1:] if content.child_messages is not None else None
        kept.append(ChatContent(content.role, message, content.message_id, content.role_type, children))
    if len(prompt.system) > allowance:  # rendered with whichever turns are kept: its own allowance
        prompt.system = prompt.system[len(prompt.system) - allowance :]
        cut = True
    if cut:
        kept.reverse()
        starts = [i for i, c in enumerate(kept) if c.role_type is RoleType.REQUESTER]
        # A turn cut after its request would render as a stray reply `fit_prompt` cannot drop:
        # it goes whole (it was too long to fit anyway).
        _keep_from(prompt, kept, starts[0] if starts else 0)
