"""Prompt-lookup drafts: the tokens a row is likely to write next, read from what it has already seen.

Much of what people ask a chat model quotes its context (edit this paragraph, fix this function,
repeat it with one change), and so does much of what the model writes back. When the row's last
few tokens occurred earlier in its prompt or reply, the tokens that followed them there are a
good guess at what comes next. The batching engine sends such a guess (a draft) through the model
with the row's next token, in the same forward pass as every other row's step, and keeps the
longest prefix of the draft the model itself would have produced, plus the model's own next
token: several tokens for the price of one step where the guess is right, one where it is wrong.
This is transformers' `prompt_lookup_num_tokens`, done per row inside a running batch.

A draft costs compute even when it is wrong (its tokens go through the model), so each row's draft
length follows its own record (`DraftLength`): it starts at the limit (a quote is taken whole from
its first step), goes back to it whenever a draft is taken whole, shrinks to what was taken when
two or more of its tokens were, and after a draft of which at most one token was taken the row
drafts nothing for a while, longer each time, probing again with a single token. Free-form text
then pays for a probe now and then, and quoting text drafts up to the limit every step. (Eight
free-form chats on two CPU cores lost 14% to drafts that kept one token a step, before a draft that
kept one token paused the row too.)
"""

from __future__ import annotations

#: The n-gram lengths looked up, longest first: a longer match is a surer guess.
NGRAM_SIZES = (3, 2)
#: Steps a row waits, at most, before probing again after drafts that were refused outright.
_LONGEST_PAUSE = 32


class Drafter:
    """One row's n-gram index over its tokens (prompt and reply), for drafting its next ones.

    `ids` is the row's own list of tokens, which the row extends as it generates: the index
    catches up with it on each `draft`, one entry per n-gram size per new token.
    """

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where the tokens after its latest occurrence start
        self._indexed = 0  # n-grams ending before this position are indexed

    def draft(self, most: int) -> list[int]:
        """Up to `most` tokens that followed the latest earlier occurrence of the row's last
        tokens (the longest n-gram found); none if they never occurred before."""
        if most <= 0:
            return []
        self._catch_up()
        for size in NGRAM_SIZES:
            if len(self.ids) > size:
                start = self._after.get(tuple(self.ids[-size:]))
                if start is not None:
                    return self.ids[start : start + most]
        return []

    def _catch_up(self) -> None:
        """Index every n-gram ending before the last position (the row's tail is what is looked up)."""
        ids, after = self.ids, self._after
        for end in range(max(self._indexed, 1), len(ids)):
            for size in NGRAM_SIZES:
                if end >= size:
                    after[tuple(ids[end - size : end])] = end
        self._indexed = max(self._indexed, len(ids))


class DraftLength:
    """How many tokens a row drafts next, from how its drafts fared (module docstring)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.length = most
        self._pause = 0  # steps left without drafting
        self._next_pause = 1

    def next(self) -> int:
        """The draft length for this step (0: draft nothing)."""
        if self._pause:
            self._pause -= 1
            return 0
        return self.length

    def took(self, offered: int, taken: int) -> None:
        """A draft of `offered` tokens had its first `taken` accepted."""
        if offered == 0:
            return
        if taken == offered:
            self.length = self.most
            self._next_pause = 1
        elif taken >= 2:
            self.length = taken
        else:  # one token or none for a draft's columns: on a device where compute is the limit, a loss
            self.length = 1
            self._pause = self._next_pause
            self._next_pause = min(_LONGEST_PAUSE, self._next_pause * 2)
