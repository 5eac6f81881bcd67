"""rinna/japanese-gpt-neox-3.6b-instruction-sft: `ユーザー: text<NL>システム: ` with `<NL>` for line breaks."""

from __future__ import annotations

from chatstream_asgi.chat_prompt_presets._base import PresetChatPrompt
from chatstream_asgi.core.prompt import ChatContent, Replacements


class ChatPromptRinnaJpGptNeoxInstSft(PresetChatPrompt):
    """The model knows no newline character: its line break is the text `<NL>`, in both directions."""

    def __init__(self) -> None:
        super().__init__()
        self.set_requester("ユーザー")
        self.set_responder("システム")

    def get_stop_strs(self) -> list[str] | None:
        return [] if self.chat_mode else None

    def get_replacement_when_input(self) -> Replacements | None:
        return [("\n", "<NL>")]

    def get_replacement_when_output(self) -> Replacements | None:
        return [("<NL>", "\n")]

    def render(self, content: ChatContent) -> str:
        if not content.role:
            return ""
        return f"{content.role}: {content.message}<NL>" if content.message else f"{content.role}: "


#: The class name ChatStream's preset list documents (its 0.3.0 package names it as above).
ChatPromptRinnaJapaneseGPTNeoxInst = ChatPromptRinnaJpGptNeoxInstSft
