"""`ConversationCache`: the key/value caches of finished turns, so the next turn prefills only what is new.

When a generation ends, the batching engine keeps its row's cache (the prompt and the reply, as
token ids and the keys and values the model computed for them). A new prompt is matched against
every kept entry by its token ids: the entry with the longest common prefix lends its keys and
values for that prefix, and only the rest of the prompt goes through the model. Matching by
token ids, not by session, makes every change to a conversation safe by construction: a
regenerate, a cleared context, history cut to fit the context or a template that renders old
turns differently simply match less (or nothing), never something wrong.

An entry is never modified: a row that borrows one builds its own tensors as it grows (the cache
concatenates), so one entry may serve many rows (a shared system prompt, two tabs of one chat).
When a new entry extends an entry it was built from, the old one is dropped (the new one covers
it). Entries are bounded by bytes, least recently used out first; 0 bytes turns the cache off.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

#: Layers of one cache: the (keys, values) of each, shaped (1, heads, tokens, dim).
Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Entry:
    ids: torch.Tensor  # (tokens,) on the CPU: what matching compares
    layers: Layers
    nbytes: int


@dataclass
class Hit:
    """A kept cache that covers the first `length` tokens of a prompt; `key` names its entry."""

    key: int
    length: int
    layers: Layers


def default_cache_bytes(device: torch.device) -> int:
    """A quarter of the memory free on `device` now (the model is loaded by then)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # no such figure on this platform
        return 256 << 20


class ConversationCache:
    """Kept caches of finished generations on one replica, matched by longest common prefix."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"conversation_cache_bytes must be 0 or more, not {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt_ids: torch.Tensor) -> Hit | None:
        """The entry sharing the longest prefix with `prompt_ids` (n,), cut to at most n - 1 tokens
        (the last prompt token must go through the model to give the first reply token)."""
        best: tuple[int, int] | None = None
        ids = prompt_ids.cpu()
        for key, entry in self._entries.items():
            length = min(len(entry.ids), len(ids) - 1)
            shared = int((entry.ids[:length] == ids[:length]).cumprod(0).sum()) if length > 0 else 0
            if shared and (best is None or shared > best[1]):
                best = (key, shared)
        if best is None:
            return None
        key, length = best
        self._entries.move_to_end(key)
        layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self._entries[key].layers]
        return Hit(key, length, layers)

    def put(self, ids: torch.Tensor, layers: Layers, *, extends: Hit | None = None) -> None:
        """Keep the cache of `ids` (tokens,); `layers` must be tensors of their own, not views of a
        larger batch. `extends` is the hit the generation started from: dropped when covered."""
        if extends is not None and extends.key in self._entries:
            if len(self._entries[extends.key].ids) <= extends.length:
                self._drop(extends.key)
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.capacity_bytes:
            return
        while self.nbytes + nbytes > self.capacity_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_key] = _Entry(ids.cpu(), layers, nbytes)
        self._next_key += 1
        self.nbytes += nbytes

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
