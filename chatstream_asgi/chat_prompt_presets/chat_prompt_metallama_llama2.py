"""meta-llama/Llama-2-chat: `<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n` then `text [/INST] reply </s><s>[INST] `.

The format is the one Hugging Face's Llama 2 blog post gives; the system block, with Meta's
default system prompt, is the system text, so `set_system` replaces all of it.
"""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent, RoleType

SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)


class ChatPromptMetaLlamaLlama2Chat(PresetChatPrompt):
    """Each user text closes with ` [/INST] `, each reply with ` </s><s>[INST] `."""

    def __init__(self) -> None:
        super().__init__()
        self.set_system(f"<s>[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n")
        self.set_requester("")
        self.set_responder("")

    def get_stop_strs(self) -> list[str] | None:
        return [] if self.chat_mode else None

    def get_custom_skip_echo_len(self, skip_echo_len: int) -> int:
        # From the second turn on, Llama 2's decode of its prompt is one character longer per turn.
        turns = self.get_turn()
        return skip_echo_len + turns if turns >= 2 else skip_echo_len

    def render(self, content: ChatContent) -> str:
        if not content.message:
            return ""
        if content.role_type is RoleType.REQUESTER:
            return f"{content.message} [/INST] "
        if content.role_type is RoleType.RESPONDER:
            return f"{content.message} </s><s>[INST] "
        return ""
