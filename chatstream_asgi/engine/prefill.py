"""Prompts on their way into the batch: how big a chunk to prefill between decode steps, and
which prompts at the front of the line can share one padded prefill pass."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from chatstream_asgi.engine.conversation_cache import CacheScope, Hit
from chatstream_asgi.engine.grouping import MAX_PADDING_SHARE, padding_share
from chatstream_asgi.engine.local import LocalJob

#: What a prefill chunk should cost while streams run, in decode steps (see `PrefillChunks`).
STEPS_PER_CHUNK = 1.5


class PrefillChunks:
    """How many prompt tokens to prefill between two decode steps.

    While streams are running, a chunk should cost about `STEPS_PER_CHUNK` decode steps: their
    next token then comes about 2.5 times as late as usual while a prompt joins, not after the
    whole prompt's prefill, and the joining prompt's own first token comes after about 1.7 times
    its whole prefill (each chunk waits for one step: 1 + 1/1.5). A chunk of one step's cost
    kept the streams' gaps at 2x but made a 1,481-token prompt wait 4x its whole prefill (issue
    21), and eight chats arriving over HTTP a few milliseconds apart joined one by one. The size
    follows what the device shows: each timed chunk scales the next one by its target seconds ÷
    its seconds (at most halved or doubled at a time, which settles in a few chunks whatever the
    model and device). With no stream running nobody waits on the steps, so a prompt goes through
    in `largest` chunks, and so do prompts that outnumber the streams and fit one pass
    (`bounded`). `fixed` sets one size for every chunk instead.
    """

    #: Below this a chunk costs about what a decode step does anyway: smaller saves nothing.
    smallest = 16
    #: The most tokens prefilled in one forward pass, which also bounds its activation memory.
    largest = 2048

    def __init__(self, fixed: int | None = None) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"prefill_chunk_tokens must be at least 1, not {fixed}")
        self.fixed = fixed
        self._tokens = fixed or 64  # until a chunk has been timed against a step (it grows fast where cheap)
        self._step_seconds: float | None = None

    def bounded(self, running: int, waiting: Sequence[int]) -> bool:
        """Whether the next chunk is held to a few decode steps' cost, with `running` streams and
        prompts of `waiting` tokens still to prefill in line. A chunk makes each running stream's
        next token late, and each decode step makes each waiting prompt's first token late: when
        more prompts wait than streams run (chats sent together, the first of them already
        streaming) and all of them fit one pass, they go through whole, and the streams miss one
        pass's worth, once. Held to the bound, eight chats arriving over HTTP a few milliseconds
        apart joined one by one, each 0.6 s after the last (issue 21); let through whole however
        long, eight 1,000-token prompts stalled the streams for a whole prefill each."""
        if not running:
            return False
        return running >= len(waiting) or sum(waiting) > self.largest

    def budget(self, running: int, waiting: Sequence[int]) -> int:
        """Prompt tokens to prefill before the next decode step (arguments as for `bounded`)."""
        if self.fixed is not None:
            return self.fixed
        return self._tokens if self.bounded(running, waiting) else self.largest

    def step_took(self, seconds: float) -> None:
        """A decode step of the running batch took `seconds`."""
        if self._step_seconds is None:
            self._step_seconds = seconds
        else:
            self._step_seconds += 0.2 * (seconds - self._step_seconds)

    def chunk_took(self, tokens: int, seconds: float) -> None:
        """A chunk of `tokens` prompt tokens, run while streams were running, took `seconds`."""
        if self.fixed is not None or self._step_seconds is None or seconds <= 0:
            return
        if tokens < self._tokens // 2:  # a prompt's short last chunk is mostly fixed cost: it misleads
            return
        scale = min(2.0, max(0.5, STEPS_PER_CHUNK * self._step_seconds / seconds))
        self._tokens = min(self.largest, max(self.smallest, round(tokens * scale)))


class Prefill:
    """A prompt on its way into the batch: its ids, the cache built so far, how far it got."""

    def __init__(
        self, job: LocalJob, prompt_ids: torch.Tensor, hit: Hit | None, cache: DynamicCache, scope: CacheScope
    ) -> None:
        self.job = job
        self.prompt_ids = prompt_ids  # (1, n)
        self.hit = hit
        self.scope = scope  # whose kept prefixes it may borrow, and whose its own cache becomes
        self.cache = cache
        self.done = hit.length if hit is not None else 0  # tokens the cache holds keys and values of
        self.alone = False  # a pass it shared with others failed: it goes through on its own

    @property
    def remaining(self) -> int:
        return int(self.prompt_ids.shape[1]) - self.done


def first_cohort(prefills: deque[Prefill], budget: int) -> list[Prefill]:
    """The prompts at the front of the line that can be prefilled whole in one padded pass: not
    started (no borrowed cache), within the budget counting padding, padded at most as much as a
    group may be."""
    cohort: list[Prefill] = []
    width = real = 0
    for prefill in prefills:
        if prefill.done or prefill.alone or prefill.job.should_stop:
            break
        widest, rows = max(width, prefill.remaining), len(cohort) + 1
        if widest * rows > budget or padding_share(widest, rows, real + prefill.remaining) > MAX_PADDING_SHARE:
            break
        cohort.append(prefill)
        width, real = widest, real + prefill.remaining
    return cohort
