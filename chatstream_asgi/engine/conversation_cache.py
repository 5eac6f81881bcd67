"""`ConversationCache`: the key/value caches of finished turns, so the next turn prefills only what is new.

When a generation ends, the batching engine keeps its row's cache (the prompt and the reply, as
token ids and the keys and values the model computed for them). A new prompt borrows the keys and
values of the longest prefix it shares with a kept entry, and only the rest of the prompt goes
through the model. Matching by token ids, not by session, makes every change to a conversation
safe by construction: a regenerate, a cleared context, history cut to fit the context or a
template that renders old turns differently simply match less (or nothing), never something wrong.

Matching runs on the engine thread, between decode steps, so it must not grow with the number
of entries. Entries are indexed as vLLM indexes its blocks: the token ids are cut into blocks of
`BLOCK_TOKENS`, and each entry is filed under a hash of each of its whole-block prefixes (the
first block, the first two, ...; BLAKE2b, so a crafted prompt cannot collide with another's). A
prompt hashes its own prefixes (work in proportion to its length), finds the longest one that is
filed, and compares tokens with the few most recently used entries filed there, which also finds
how far into the next, partial block they agree. A prompt shares nothing below one whole block.

The cache is partitioned: a prompt borrows only from entries of its own `CacheScope.tenant` (the
engine's caller names the tenant: a session, an API key, a client address, with the client's
`cache_salt`), so no tenant can time another's prompts by how much of them is already cached.
Each tenant's hashes start from a seed of its own, so another tenant's entries are not even
found. The one exception is what the operator declared public (`CacheScope.public`: the first
tokens of a prompt that are a shared system prompt as rendered alone): an entry's public
beginning is filed a second time, under hashes every tenant computes alike, and any prompt with
the same public beginning may borrow that far, and no farther.

An entry is never modified: a row that borrows one builds its own tensors as it grows (the cache
concatenates), so one entry may serve many rows (a shared system prompt, two tabs of one chat).
When a new entry extends an entry it was built from, the old one is dropped (the new one covers
it). Entries are bounded by bytes and by count, least recently used out first, and an entry
unused for `ttl` seconds is dropped; 0 bytes turns the cache off.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch

#: Layers of one cache: the (keys, values) of each, shaped (1, heads, tokens, dim).
Layers = list[tuple[torch.Tensor, torch.Tensor]]

#: Tokens per indexed block: a prompt shares at least one whole block or nothing. Half vLLM's 16, so
#: that even a short first turn (a template's few tokens and a line) lends its conversation one.
BLOCK_TOKENS = 8
#: Entries compared token by token per match, most recently used first, among those sharing the
#: prompt's longest filed prefix: a conversation's own last turn is the most recent one there.
_CANDIDATES = 4
#: The default byte budget's ceiling: the process does not own the machine.
DEFAULT_CACHE_BYTES = 1 << 30
#: The default bound on entries (each is one finished generation: a conversation's last turn).
DEFAULT_MAX_ENTRIES = 10_000
#: Seconds an entry may go unused before it is dropped (a conversation left alone that long).
DEFAULT_TTL = 1800.0


@dataclass(frozen=True)
class CacheScope:
    """Which kept prefixes a prompt may borrow: its `tenant`'s own, and up to its first `public`
    tokens (a beginning the operator declared shared) anyone's. The default scope is one tenant."""

    tenant: str = ""
    public: int = 0


@dataclass
class _Entry:
    ids: torch.Tensor  # (tokens,) on the CPU: what matching compares
    layers: Layers
    nbytes: int
    tenant: str
    hashes: list[bytes]  # the index keys it is filed under: its tenant's, then the public ones
    used: float = field(default=0.0)  # clock time of its last put or match


@dataclass
class Hit:
    """A kept cache that covers the first `length` tokens of a prompt; `key` names its entry."""

    key: int
    length: int
    layers: Layers


def default_cache_bytes(device: torch.device) -> int:
    """1 GiB, or a quarter of the memory free on `device` now when that is less (the model is
    loaded by then): other processes share the machine, so the default takes a bounded share."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(DEFAULT_CACHE_BYTES, int(free) // 4)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such figure on this platform
        return 256 << 20
    return min(DEFAULT_CACHE_BYTES, free // 4)


def _seed(tenant: str | None) -> bytes:
    """Where a chain of prefix hashes starts: one seed per tenant, one (None) for public prefixes."""
    name = b"public" if tenant is None else b"tenant:" + tenant.encode()
    return hashlib.blake2b(name, digest_size=16).digest()


def _prefix_hashes(ids: torch.Tensor, blocks: int, seed: bytes) -> Iterator[bytes]:
    """The hash of each whole-block prefix of `ids` (tokens,), shortest first, `blocks` of them."""
    data = ids[: blocks * BLOCK_TOKENS].to(torch.int64).numpy().tobytes()
    running = hashlib.blake2b(seed, digest_size=16)
    width = BLOCK_TOKENS * 8
    for block in range(blocks):
        running.update(data[block * width : (block + 1) * width])
        yield running.copy().digest()


class ConversationCache:
    """Kept caches of finished generations on one replica, matched by longest common prefix."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        ttl: float | None = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"conversation_cache_bytes must be 0 or more, not {capacity_bytes}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be positive seconds or None, not {ttl!r}")
        self.capacity_bytes = capacity_bytes
        self.max_entries = max_entries
        self.ttl = ttl
        self.nbytes = 0
        self._clock = clock
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        # Prefix hash -> the keys of the entries filed under it, least recently used first.
        self._index: dict[bytes, dict[int, None]] = {}
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt_ids: torch.Tensor, scope: CacheScope = CacheScope()) -> Hit | None:
        """The entry of `scope` sharing the longest prefix with `prompt_ids` (n,), cut to at most
        n - 1 tokens (the last prompt token must go through the model to give the first reply token)."""
        self._expire()
        ids = prompt_ids.cpu()
        usable = len(ids) - 1
        public = min(scope.public, usable)
        own = self._candidates(ids, usable // BLOCK_TOKENS, _seed(scope.tenant))
        # (A tenant's seed already keeps others' entries out of its hashes: this keeps them out should that fail.)
        candidates = [(key, usable) for key in own if self._entries[key].tenant == scope.tenant]
        candidates += [(key, public) for key in self._candidates(ids, public // BLOCK_TOKENS, _seed(None))]
        best: tuple[int, int] | None = None
        for key, most in candidates:
            entry = self._entries[key]
            length = min(len(entry.ids), most)
            shared = int((entry.ids[:length] == ids[:length]).cumprod(0).sum())
            if best is None or shared > best[1]:
                best = (key, shared)
        if best is None or best[1] < BLOCK_TOKENS:  # (below a block: a hash collision, or a crafted prompt)
            return None
        key, length = best
        entry = self._touch(key)
        return Hit(key, length, [(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers])

    def put(
        self, ids: torch.Tensor, layers: Layers, *, scope: CacheScope = CacheScope(), extends: Hit | None = None
    ) -> None:
        """Keep the cache of `ids` (tokens,) for `scope`; `layers` must be tensors of their own, not
        views of a larger batch. `extends` is the hit the generation started from: dropped when
        covered, if it is the same tenant's (another's entry is theirs to keep)."""
        self._expire()
        if extends is not None and extends.key in self._entries:
            covered = self._entries[extends.key]
            if covered.tenant == scope.tenant and len(covered.ids) <= extends.length:
                self._drop(extends.key)
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.capacity_bytes:
            return
        while self._entries and (self.nbytes + nbytes > self.capacity_bytes or len(self._entries) >= self.max_entries):
            self._drop(next(iter(self._entries)))
        ids = ids.cpu()
        key = self._next_key
        self._next_key += 1
        hashes = list(_prefix_hashes(ids, len(ids) // BLOCK_TOKENS, _seed(scope.tenant)))
        hashes += _prefix_hashes(ids, min(scope.public, len(ids)) // BLOCK_TOKENS, _seed(None))
        self._entries[key] = _Entry(ids, layers, nbytes, scope.tenant, hashes, self._clock())
        for digest in hashes:
            self._index.setdefault(digest, {})[key] = None
        self.nbytes += nbytes

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._index.clear()
        self.nbytes = 0

    def _candidates(self, ids: torch.Tensor, blocks: int, seed: bytes) -> list[int]:
        """The few most recently used entries filed under the longest of the first `blocks`
        whole-block prefixes of `ids` (hashed from `seed`) that is filed at all."""
        filed: dict[int, None] | None = None
        for digest in _prefix_hashes(ids, blocks, seed):
            deeper = self._index.get(digest)
            if deeper is None:
                break  # the index is prefix-closed: nothing longer is filed either
            filed = deeper
        return [] if filed is None else list(islice(reversed(filed), _CANDIDATES))

    def _touch(self, key: int) -> _Entry:
        """Mark an entry used now: last out of the byte and count bounds, and first among its
        prefixes' candidates."""
        entry = self._entries[key]
        entry.used = self._clock()
        self._entries.move_to_end(key)
        for digest in entry.hashes:
            filed = self._index[digest]
            del filed[key]
            filed[key] = None
        return entry

    def _expire(self) -> None:
        """Drop the entries unused for `ttl` seconds (the oldest come first in use order)."""
        if self.ttl is None:
            return
        oldest = self._clock() - self.ttl
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.used > oldest:
                return
            self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        for digest in entry.hashes:
            filed = self._index[digest]
            del filed[key]
            if not filed:
                del self._index[digest]
