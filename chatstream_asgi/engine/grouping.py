"""Which rows step together: rows of very different lengths run in groups of their own.

Padding costs what real tokens cost: eight short chats padded to one long conversation's length
attend over (and copy, every step) eight long caches. So a new row joins the group it pads
least, and starts a group of its own when every group would be mostly padding: a long
conversation joining short ones costs the step its own row, not seven rows' worth of padding.
"""

from __future__ import annotations

from typing import Any

from chatstream_asgi.engine.batch import Batch

#: A row joins a group while the group's padding stays at most this share of its cache (rows
#: whose lengths differ up to about 2x); past it, another forward pass costs less than padding.
MAX_PADDING_SHARE = 0.5
#: Groups in one step at most: each costs a pass over the weights (what dominates a GPU's step).
MAX_GROUPS = 4


def padding_share(width: int, rows: int, real: int) -> float:
    """The share of a left-padded (rows, width) block that is padding when `real` tokens are real."""
    return 1 - real / (width * rows)


def padding_with(batch: Batch, length: int) -> float:
    """The share of `batch`'s cache that would be padding with a row of `length` tokens added."""
    width = max(int(batch.mask.shape[1]), length)
    return padding_share(width, len(batch.rows) + 1, int(batch.positions.sum()) + length)


def group_for(groups: list[Batch], length: int, config: Any) -> Batch:
    """The group a new row of `length` tokens joins: the one it pads least, if within
    `MAX_PADDING_SHARE` (or once `MAX_GROUPS` run), else a new group."""
    if groups:
        least = min(groups, key=lambda group: padding_with(group, length))
        if padding_with(least, length) <= MAX_PADDING_SHARE or len(groups) >= MAX_GROUPS:
            return least
    group = Batch(config)
    groups.append(group)
    return group
