"""`GrowingLayer`: a key/value cache layer that grows in place, for the batching engine.

transformers' `DynamicLayer` appends a decode step's keys and values with `torch.cat`: every step,
every layer copies its whole cache to add one column. With 8 chats of 4,000 tokens that copying
took a sixth of all decode time (issue 21's profile of SmolLM2-135M), more than the attention
itself costs at shorter lengths. Here the keys and values live in buffers with room to spare
along the sequence: a step writes its columns into the room, and attention reads views of the
used part. A buffer is copied only when its room runs out (it then grows by a quarter of its
length at least, so a long reply copies its cache a handful of times, not once a token), when
rows leave the batch (the rows that stay get a buffer of their own, trimmed to their length plus
room), and when rows merge.

Why not `StaticCache`: it sizes every row to one maximum length up front, so eight short chats
would hold eight contexts' memory, and its rows can neither be merged nor trimmed on the left as
the batch changes. Why not a paged cache (vLLM's blocks, transformers' continuous batching):
attention would need a kernel that reads scattered blocks, where the eager and SDPA paths every
model has read one (batch, heads, length, dim) tensor, which a view of a buffer is.

Grouped-query heads are not copied either: for a decode step (one query per row) transformers'
SDPA path attends on the key/value heads themselves (`pack_gqa`), and a prefill chunk, which is
compute-bound, expands them once per chunk.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: The least room a buffer is given beyond what it holds, in positions.
_LEAST_ROOM = 64


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A cache layer whose `keys` and `values` are views of buffers with room to grow (module docstring)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._key_room: torch.Tensor | None = None
        self._value_room: torch.Tensor | None = None
        self._start = 0  # the used columns of the buffers: [start, end)
        self._end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns after the used ones (growing the buffers if they are full), and
        return views of every used column."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        added = key_states.shape[-2]
        if self._key_room is None or self._end + added > self._key_room.shape[-2]:
            self._move_to_new_room(*self._used_or_empty(key_states, value_states), added)
        assert self._key_room is not None and self._value_room is not None
        self._key_room[:, :, self._end : self._end + added] = key_states
        self._value_room[:, :, self._end : self._end + added] = value_states
        self._end += added
        return self._publish()

    def trim_left(self, columns: int) -> None:
        """Forget the first `columns` positions (padding no row attends to any more): no copy."""
        self._start = min(self._end, self._start + columns)
        self._publish()

    def cut_to(self, length: int) -> None:
        """Keep only the first `length` positions (undoing a failed step's writes): no copy."""
        self._end = min(self._end, self._start + length)
        self._publish()

    def keep_step_prefixes(self, start: int, kept: torch.Tensor, width: int) -> None:
        """Of the columns from `start` on (one step's, drafts included), row i keeps its first
        `kept[i]`, moved right so that every row's end together at `start + width`; the columns
        that open up before a row's kept ones are holes its attention mask must hide."""
        keys, values = self._published()
        rows, heads, _, _ = keys.shape
        shift = width - kept.to(keys.device)
        source = (torch.arange(width, device=keys.device)[None, :] - shift[:, None]).clamp(min=0)
        kept_keys = keys[:, :, start:].gather(2, source[:, None, :, None].expand(rows, heads, width, keys.shape[-1]))
        kept_values = values[:, :, start:].gather(
            2, source[:, None, :, None].expand(rows, heads, width, values.shape[-1])
        )
        assert self._key_room is not None and self._value_room is not None
        begin = self._start + start
        self._key_room[:, :, begin : begin + width] = kept_keys
        self._value_room[:, :, begin : begin + width] = kept_values
        self._end = begin + width
        self._publish()

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold `keys` and `values` (copied into buffers of their own) instead of what it held."""
        self._move_to_new_room(keys, values, 0)
        self._publish()

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop: a negative count removes that many positions from the end."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove, not {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.cut_to(self._end - self._start + tokens_to_remove)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices`, in buffers of their own sized to them."""
        if self.get_seq_length() > 0:
            keys, values = self._published()
            self._move_to_new_room(keys[indices], values[indices], 0)
            self._publish()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            keys, values = self._published()
            self._move_to_new_room(keys.repeat_interleave(repeats, 0), values.repeat_interleave(repeats, 0), 0)
            self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            keys, values = self._published()
            index = beam_idx.to(keys.device)
            self._move_to_new_room(keys.index_select(0, index), values.index_select(0, index), 0)
            self._publish()

    def reset(self) -> None:
        self._key_room = self._value_room = None
        self._start = self._end = 0
        super().reset()

    @property
    def room(self) -> int:
        """Positions the buffers hold in all, used or not (what the layer's memory is sized by)."""
        return 0 if self._key_room is None else int(self._key_room.shape[-2])

    def _used_or_empty(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key_room is not None:
            return self._published()
        empty = list(key_states.shape)
        empty[-2] = 0
        return key_states.new_empty(empty), value_states.new_empty([*empty[:-1], value_states.shape[-1]])

    def _move_to_new_room(self, keys: torch.Tensor, values: torch.Tensor, adding: int) -> None:
        """Copy `keys` and `values` (the used positions) to the start of new buffers with room for
        `adding` more and then some."""
        used = keys.shape[-2]
        size = used + adding + max(_LEAST_ROOM, (used + adding) // 4)
        key_shape, value_shape = list(keys.shape), list(values.shape)
        key_shape[-2] = value_shape[-2] = size
        self._key_room = keys.new_empty(key_shape)
        self._value_room = values.new_empty(value_shape)
        self._key_room[:, :, :used] = keys
        self._value_room[:, :, :used] = values
        self._start, self._end = 0, used

    def _published(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._key_room is not None and self._value_room is not None
        return self._key_room[:, :, self._start : self._end], self._value_room[:, :, self._start : self._end]

    def _publish(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self._published()
        return self.keys, self.values


def growing_cache(config: Any) -> DynamicCache:
    """A `DynamicCache` for `config` whose layers grow in place (every layer must be a plain
    `DynamicLayer` in transformers' own cache: `batch.supports_batching` checks it)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache
