"""ReplyShaper: the shown reply is `replace(reply.strip())`, however the text is split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatstream_asgi import ChatPrompt, ChatPromptRinnaJpGptNeoxInstSft
from chatstream_asgi.core.reply import ReplyShaper

PAIRS = [("<NL>", "\n"), ("aa", "b"), ("ab", "<NL>")]


def shaped(pieces: list[str], *, strip: bool, pairs: list[tuple[str, str]]) -> str:
    shaper = ReplyShaper(strip=strip, replacements=pairs)
    return "".join(shaper.feed(piece) for piece in pieces) + shaper.flush()


def replaced(text: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


@given(st.lists(st.text(alphabet="ab<NL> \n", max_size=6), max_size=8), st.booleans())
def test_shown_reply_equals_the_replacements_applied_to_the_whole_stripped_reply(
    pieces: list[str], strip: bool
) -> None:
    whole = "".join(pieces)
    assert shaped(pieces, strip=strip, pairs=PAIRS) == replaced(whole.strip() if strip else whole, PAIRS)


def test_a_possible_start_of_a_replaced_text_is_held_back_until_it_resolves() -> None:
    shaper = ReplyShaper(strip=False, replacements=[("<NL>", "\n")])
    assert shaper.feed("line<N") == "line"
    assert shaper.feed("L>next<") == "\nnext"
    assert shaper.feed("b>") == "<b>"


def test_trailing_whitespace_waits_for_more_text_and_is_dropped_at_the_end() -> None:
    shaper = ReplyShaper(strip=True, replacements=[])
    assert shaper.feed(" Hello ") == "Hello"
    assert shaper.feed("you ") == " you"
    assert shaper.flush() == ""


def test_template_prompts_get_no_shaper_and_rinna_gets_one() -> None:
    assert ReplyShaper.for_prompt(ChatPrompt()) is None
    assert ReplyShaper.for_prompt(ChatPromptRinnaJpGptNeoxInstSft()) is not None
