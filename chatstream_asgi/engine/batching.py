"""`BatchingEngine`: concurrent generations on one replica share every forward pass.

One thread runs a decode loop over a batch that changes at step boundaries. A new request is
prefilled alone (its prompt through the model once, its own cache), then merged into the
running batch: caches are left-padded to a common length and an attention mask hides the
padding, while each row keeps its own position ids. A row leaves on its end token, its length,
a stop string or a cancel, without stalling the others; columns no row needs any more are
trimmed. Each row samples with its own parameters, all rows of a step at once (`BatchSampling`).

When a generation ends, its row's cache is kept in the replica's `ConversationCache`: the next
prompt that starts with the same tokens (the conversation's next turn, a regenerate) borrows the
keys and values of that prefix and prefills only the rest.

A batch of one does exactly what `model.generate` does, step for step (the tests check the
tokens are identical under greedy decoding), and eight rows cost little more than one on a
CPU and far less than eight on a GPU: the forward pass reads the weights once for all of them.

It needs a decoder-only model whose cache is the plain `DynamicCache` of per-layer
(batch, heads, length, dim) tensors; `supports_batching` says whether a model qualifies, and
`ChatStream` falls back to `TransformersEngine` when it does not.
"""

from __future__ import annotations

import inspect
import logging
import queue
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chatstream_asgi.engine.channel import Wakeups
from chatstream_asgi.engine.conversation_cache import ConversationCache, Hit, Layers, default_cache_bytes
from chatstream_asgi.engine.local import LocalEngine, LocalJob
from chatstream_asgi.engine.sampling import BatchSampling

logger = logging.getLogger(__name__)


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


class _Row:
    """One generation in the batch."""

    def __init__(self, job: LocalJob, prompt_ids: list[int], hit: Hit | None) -> None:
        self.job = job
        self.ids = prompt_ids  # every token so far: what its cache holds keys and values of
        self.hit = hit  # the kept cache its prompt started from


class _Batch:
    """The running rows, their shared cache, attention mask and positions."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self.clear()

    def clear(self) -> None:
        """No rows."""
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.empty(0)
        self.positions = torch.empty(0)
        self.tokens = torch.empty(0)
        self.sampling: BatchSampling | None = None

    def add(self, row: _Row, cache: DynamicCache, length: int, token: torch.Tensor, sampling: BatchSampling) -> None:
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
        merged = DynamicCache(config=self._config)
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

    def row_cache(self, index: int) -> tuple[int, Layers]:
        """The tokens row `index` has keys and values for, and a copy of them of its own."""
        assert self.cache is not None
        length = int(self.positions[index])  # its columns are the last ones: padding is on the left
        rows = slice(index, index + 1)
        return length, [(k[rows, :, -length:].clone(), v[rows, :, -length:].clone()) for k, v in _layers(self.cache)]

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
                assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
                layer.keys = layer.keys[..., start:, :]
                layer.values = layer.values[..., start:, :]


def _layers(cache: DynamicCache) -> Layers:
    """The keys and values of every layer of `cache`."""
    layers = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        layers.append((layer.keys, layer.values))
    return layers


def _cached_length(layer: Any) -> int:
    """How many positions a cache layer holds."""
    return int(_keys_values(layer)[0].shape[-2])


def _keys_values(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad_left(tensor: torch.Tensor, amount: int, dim: int = -2) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BatchingEngine(LocalEngine):
    """Generates with a Hugging Face causal LM, all running requests in one batch per step.

    `max_batch_size` bounds the rows; admission (`num_of_concurrent_executions`) keeps the
    number of running requests within it. `conversation_cache_bytes` bounds the kept caches of
    finished generations (None: a quarter of the memory free on the device at start; 0: off).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = "auto",
        max_batch_size: int = 16,
        conversation_cache_bytes: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if not supports_batching(model):
            raise ValueError(f"{type(model).__name__} cannot be batched here; use TransformersEngine")
        super().__init__(model, tokenizer, device=device)
        self.max_batch_size = max_batch_size
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._wakeups = Wakeups()
        if conversation_cache_bytes is None:
            conversation_cache_bytes = default_cache_bytes(self.device)
        self.conversations = ConversationCache(conversation_cache_bytes)  # the engine thread's alone
        self._start_threads(1, self._work)

    # -- the engine thread ------------------------------------------------------------------------

    def _work(self) -> None:
        with torch.inference_mode():
            self._warm_up_once(self._warm_up)
            batch = _Batch(self.model.config)
            while True:
                arrivals = self._arrivals(wait=not batch.rows)
                if arrivals is None:
                    return
                try:
                    self._advance(batch, arrivals)
                except Exception as error:  # a bug here must not leave requests waiting forever
                    logger.exception("batching engine step failed")
                    for job in [row.job for row in batch.rows] + arrivals:
                        job.fail(error)  # (a job that already ended keeps its ending)
                    batch.clear()
                    self._wakeups.deliver()

    def _advance(self, batch: _Batch, arrivals: list[LocalJob]) -> None:
        """Take in the arrivals, then run one decode step."""
        for job in arrivals:
            job.channel.wakeups = self._wakeups
            self._join(batch, job)
        self._wakeups.deliver()  # first tokens go out now, not after the next step
        if batch.rows:
            self._step(batch)
            self._wakeups.deliver()  # one trip to the event loop for every row of the step

    def _arrivals(self, wait: bool) -> list[LocalJob] | None:
        """Jobs that came in since the last step (blocking while the batch is empty); None: close."""
        arrivals: list[LocalJob] = []
        try:
            job = self._jobs.get() if wait else self._jobs.get_nowait()
            while True:
                if job is None:
                    return None
                arrivals.append(job)
                job = self._jobs.get_nowait()
        except queue.Empty:
            return arrivals

    def _warm_up(self) -> None:
        ids = torch.tensor([[self.fallback_token_id()]], device=self.device)
        out = self.model(input_ids=ids, cache=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1)
        mask = torch.ones(1, 2, dtype=torch.long, device=self.device)
        position = torch.tensor([[1]], device=self.device)
        self.model(
            input_ids=ids, attention_mask=mask, position_ids=position, cache=out.cache, use_cache=True, logits_to_keep=1
        )

    def _join(self, batch: _Batch, job: LocalJob) -> None:
        """Prefill `job` alone, send its first token, and merge it into the batch (or end it)."""
        if job.should_stop:  # cancelled while queued for the engine: never start
            job.skip()
            return
        try:
            prompt_ids = self.encode_prompt(job)
            job.start_text(self.tokenizer)
            hit = self.conversations.match(prompt_ids[0])
            cache = DynamicCache(config=self.model.config)
            for index, (keys, values) in enumerate(hit.layers if hit is not None else []):
                cache.update(keys, values, index)
            job.stats.cached_prompt_tokens = hit.length if hit is not None else 0
            out = self.model(
                input_ids=prompt_ids[:, job.stats.cached_prompt_tokens :],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            row = _Row(job, prompt_ids[0].tolist(), hit)
            logits = out.logits[:, -1, :]
            sampling = BatchSampling.for_row(job.params, prompt_ids[0], logits.shape[-1])
            token = sampling.sample(logits)
            running = self._emit(row, int(token[0]))
        except Exception as error:  # reported to the one request it belongs to; the batch goes on
            logger.exception("prefill failed")
            job.fail(error)
            return
        if running:
            batch.add(row, out.cache, prompt_ids.shape[1], token, sampling)
        else:
            self._keep_conversation(row, prompt_ids.shape[1], _layers(out.cache))

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row; rows that are done leave the batch."""
        keep = []
        for index, row in enumerate(batch.rows):
            if row.job.should_stop:  # cancelled between steps: it gets no further step
                row.job.finish()
            else:
                keep.append(index)
        self._leave(batch, keep)
        if not batch.rows:
            return
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        assert batch.cache is not None
        lengths = [_cached_length(layer) for layer in batch.cache.layers]
        try:
            out = self.model(
                input_ids=batch.tokens,
                attention_mask=batch.mask,
                position_ids=batch.positions,
                cache=batch.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits, cache = out.logits[:, -1, :], out.cache
        except Exception:
            logger.exception("batched decode step failed; stepping its rows one at a time to find whose it was")
            apart = self._forward_apart(batch, lengths)
            if apart is None:
                return
            logits, cache = apart
        try:
            assert batch.sampling is not None
            tokens = batch.sampling.sample(logits)
        except Exception as error:  # sampling the batch at once cannot say whose fault it was
            logger.exception("batched sampling failed")
            for row in batch.rows:
                row.job.fail(error)
            batch.clear()
            return
        batch.cache = cache
        batch.positions = batch.positions + 1
        batch.tokens = tokens.view(-1, 1)
        keep = [
            i for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)) if self._emit(row, token)
        ]
        self._leave(batch, keep)

    def _leave(self, batch: _Batch, keep: list[int]) -> None:
        """Drop the rows not in `keep`, keeping the cache of each for the conversation's next turn."""
        if self.conversations.capacity_bytes and len(keep) < len(batch.rows):
            staying = set(keep)
            for index, row in enumerate(batch.rows):
                if index not in staying:
                    self._keep_conversation(row, *batch.row_cache(index))
        batch.keep(keep)

    def _keep_conversation(self, row: _Row, length: int, layers: Layers) -> None:
        """Keep the keys and values of a finished row's first `length` tokens."""
        self.conversations.put(torch.tensor(row.ids[:length]), layers, extends=row.hit)

    def _forward_apart(self, batch: _Batch, lengths: list[int]) -> tuple[torch.Tensor, DynamicCache] | None:
        """After a batched decode step failed, run each row's step alone: a row whose own step
        fails fails; the others go on, in a batch of their own logits and cache. None: no row
        is left. The cache is first cut back to `lengths`, undoing the failed step's writes."""
        assert batch.cache is not None
        for layer, length in zip(batch.cache.layers, lengths, strict=True):
            assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
        keep: list[int] = []
        logits: list[torch.Tensor] = []
        caches: list[DynamicCache] = []
        for index, row in enumerate(batch.rows):
            alone = DynamicCache(config=self.model.config)
            for number, layer in enumerate(batch.cache.layers):
                keys, values = _keys_values(layer)
                alone.update(keys[index : index + 1], values[index : index + 1], number)
            try:
                out = self.model(
                    input_ids=batch.tokens[index : index + 1],
                    attention_mask=batch.mask[index : index + 1],
                    position_ids=batch.positions[index : index + 1],
                    cache=alone,
                    use_cache=True,
                    logits_to_keep=1,
                )
            except Exception as error:  # this row's own step fails: it is this row's failure
                logger.exception("decode step of one generation failed")
                row.job.fail(error)
                continue
            keep.append(index)
            logits.append(out.logits[:, -1, :])
            caches.append(out.cache)
        if not keep:
            batch.clear()
            return None
        merged = DynamicCache(config=self.model.config)
        for number in range(len(lengths)):
            parts = [_keys_values(cache.layers[number]) for cache in caches]
            merged.update(torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]), number)
        selected = torch.tensor(keep, device=batch.mask.device)
        batch.mask = batch.mask[selected]
        batch.positions = batch.positions[selected]
        batch.tokens = batch.tokens[selected]
        batch.rows = [batch.rows[i] for i in keep]
        assert batch.sampling is not None
        batch.sampling = batch.sampling.select(selected)
        return torch.cat(logits), merged

    def _emit(self, row: _Row, token: int) -> bool:
        """Hand one token to its job; False (and the job finished) when the row is done."""
        job = row.job
        if token in self._eos:
            job.decode_steps += 1
            job.finish("stop")
            return False
        job.accept((token,))
        row.ids.append(token)
        if job.should_stop or job.stats.completion_tokens >= job.params.max_new_tokens:
            job.finish()
            return False
        return True
