"""The running batch of `BatchingEngine`: its rows, their shared left-padded cache, mask and positions.

A prefilled row is merged in by padding the shorter side on the left, so every row ends at the
same column and one forward pass steps them all; an attention mask hides the padding, while each
row keeps its own position ids. A row that leaves takes its columns with it when no other row
needs them. The cache grows in place (`growing_cache`): a step writes its column into spare room
rather than copying the whole cache to append it. Only a decoder-only model whose cache is the
plain `DynamicCache` of per-layer (batch, heads, length, dim) tensors can be batched this way
(`supports_batching`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chatstream_asgi.engine.conversation_cache import CacheScope, Hit, Layers
from chatstream_asgi.engine.growing_cache import GrowingLayer, growing_cache
from chatstream_asgi.engine.local import LocalJob
from chatstream_asgi.engine.lookup import Drafter, DraftLength
from chatstream_asgi.engine.sampling import BatchSampling

#: Columns that must be freed at least for a compaction to be worth its copy of the cache.
_LEAST_COMPACTED = 16


def supports_batching(model: Any) -> bool:
    """Whether `BatchingEngine` can drive `model` (else use `TransformersEngine`)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    parameters = inspect.signature(model.forward).parameters
    if not {"cache", "attention_mask", "position_ids", "logits_to_keep"} <= set(parameters):
        return False
    try:
        layers = DynamicCache(config=config).layers
    except (TypeError, ValueError, AttributeError):
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


class Row:
    """One generation in the batch."""

    def __init__(
        self, job: LocalJob, prompt_ids: list[int], hit: Hit | None, scope: CacheScope, most_drafted: int = 0
    ) -> None:
        self.job = job
        self.ids = prompt_ids  # every token so far: what its cache holds keys and values of
        self.hit = hit  # the kept cache its prompt started from
        self.scope = scope  # the conversation cache's partition its cache is kept in
        self.drafter = Drafter(self.ids)  # prompt lookup over its own tokens
        self.draft_length = DraftLength(most_drafted)

    def draft(self) -> list[int]:
        """The tokens it drafts this step: none past its reply's limit (the step adds one of its own)."""
        room = self.job.params.max_new_tokens - self.job.stats.completion_tokens - 1
        return self.drafter.draft(min(self.draft_length.next(), room))


class Batch:
    """The running rows, their shared cache, attention mask and positions."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self.clear()

    def clear(self) -> None:
        """No rows."""
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.empty(0)
        self.positions = torch.empty(0)
        self.tokens = torch.empty(0)
        self.sampling: BatchSampling | None = None

    def add(self, row: Row, cache: DynamicCache, length: int, token: torch.Tensor, sampling: BatchSampling) -> None:
        """Merge a prefilled row: pad the shorter side on the left so every row ends together."""
        device = token.device
        if self.cache is None:
            self.cache = cache
            self.mask = torch.ones(1, length, dtype=torch.long, device=device)
            self.positions = torch.tensor([[length]], device=device)
            self.tokens = token.view(1, 1)
            self.rows = [row]
            self.sampling = sampling
            return
        width = self.mask.shape[1]
        common = max(width, length)
        merged = growing_cache(self._config)
        for index, (ours, theirs) in enumerate(zip(self.cache.layers, cache.layers, strict=True)):
            assert isinstance(ours, DynamicLayer) and isinstance(theirs, DynamicLayer)
            assert ours.keys is not None and ours.values is not None
            assert theirs.keys is not None and theirs.values is not None
            keys = torch.cat([_pad_left(ours.keys, common - width), _pad_left(theirs.keys, common - length)])
            values = torch.cat([_pad_left(ours.values, common - width), _pad_left(theirs.values, common - length)])
            merged.update(keys, values, index)
        new_mask = torch.zeros(1, common, dtype=torch.long, device=device)
        new_mask[0, common - length :] = 1
        self.mask = torch.cat([_pad_left(self.mask, common - width, dim=1), new_mask])
        self.cache = merged
        self.positions = torch.cat([self.positions, torch.tensor([[length]], device=device)])
        self.tokens = torch.cat([self.tokens, token.view(1, 1)])
        self.rows.append(row)
        assert self.sampling is not None
        self.sampling = BatchSampling.concat([self.sampling, sampling])

    def row_cache(self, index: int, most: int) -> tuple[int, Layers]:
        """The keys and values of row `index`'s first `most` tokens at most (copies of its own),
        and how many tokens they are. Its columns are the ones its mask shows: padding on the
        left, and the holes of refused drafts, are not its."""
        assert self.cache is not None
        columns = self.mask[index].nonzero().squeeze(1)[:most]
        rows = slice(index, index + 1)
        layers = cache_layers(self.cache)
        return len(columns), [(k[rows, :, columns], v[rows, :, columns]) for k, v in layers]

    def keep_step(self, width_before: int, kept: torch.Tensor) -> None:
        """After a step that ran drafts: row i keeps `kept[i]` of the step's columns (its input
        token and the draft tokens it kept), moved to end together; the others' gaps are masked."""
        assert self.cache is not None
        width = int(kept.max())
        for layer in self.cache.layers:
            assert isinstance(layer, GrowingLayer)
            layer.keep_step_prefixes(width_before, kept, width)
        block = torch.arange(width, device=self.mask.device)[None, :] >= (width - kept.to(self.mask.device))[:, None]
        self.mask = torch.cat([self.mask[:, :width_before], block.long()], dim=1)
        self.positions = self.positions + kept.view(-1, 1).to(self.positions.device)

    def compact(self) -> None:
        """When the holes refused drafts left (and padding) make up over a fifth of the cache,
        move every row's columns to the right end again: attention then reads only what it uses."""
        assert self.cache is not None
        lengths = self.mask.sum(dim=1)
        longest, width = int(lengths.max()), self.mask.shape[1]
        if (width - longest) * 5 <= width or width - longest < _LEAST_COMPACTED:
            return
        order = torch.argsort(self.mask, dim=1, stable=True)  # each row: its holes first, then its columns in order
        source = order[:, width - longest :]
        self.mask = (torch.arange(longest, device=self.mask.device)[None, :] >= (longest - lengths)[:, None]).long()
        for layer in self.cache.layers:
            assert isinstance(layer, GrowingLayer)
            keys, values = keys_values(layer)
            index = source[:, None, :, None].to(keys.device)
            rows, heads = keys.shape[:2]
            layer.replace(
                keys.gather(2, index.expand(rows, heads, longest, keys.shape[-1])),
                values.gather(2, index.expand(rows, heads, longest, values.shape[-1])),
            )

    def keep(self, keep: list[int]) -> None:
        """Drop every row not in `keep`, and the cache columns only they needed."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.mask.device)
        assert self.cache is not None
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.tokens = self.tokens[index]
        self.rows = [self.rows[i] for i in keep]
        assert self.sampling is not None
        self.sampling = self.sampling.select(index)
        start = int(self.mask.any(dim=0).int().argmax())  # first column some row still attends to
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                assert isinstance(layer, GrowingLayer)
                layer.trim_left(start)


def cache_layers(cache: DynamicCache) -> Layers:
    """The keys and values of every layer of `cache`."""
    layers = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        layers.append((layer.keys, layer.values))
    return layers


def cached_length(layer: Any) -> int:
    """How many positions a cache layer holds."""
    return int(keys_values(layer)[0].shape[-2])


def keys_values(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of one cache layer."""
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad_left(tensor: torch.Tensor, amount: int, dim: int = -2) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
