"""`BatchingEngine`: concurrent generations on one replica share every forward pass.

One thread runs a decode loop over a batch that changes at step boundaries. A new request is
prefilled alone (its prompt through the model, into a cache of its own), then merged into the
running batch: caches are left-padded to a common length and an attention mask hides the
padding, while each row keeps its own position ids.

A long prompt is prefilled a chunk at a time, one chunk between two decode steps, so the streams
already running slow down while it joins instead of stopping for its whole prefill
(`prefill.PrefillChunks` sizes the chunks to cost about one and a half decode steps, unless more
prompts wait than streams run and all fit one pass). Prompts that arrive together are prefilled
together, in one padded forward pass, when they fit one budget.

Padding costs what real tokens cost: eight short chats padded to one long conversation's length
attend over (and copy, every step) eight long caches. So rows of very different lengths run in
separate groups, one forward pass each per step (`grouping.group_for`): a long conversation joining
short ones costs the step its own row, not seven rows' worth of padding.

A row leaves on its end token, its length, a stop string or a cancel, without stalling the
others; columns no row needs any more are trimmed. Each row samples with its own parameters,
all rows of a step at once (`BatchSampling`).

When a generation ends, its row's cache is kept in the replica's `ConversationCache`: the next
prompt of the same tenant (`GenerationParams.cache_scope`) that starts with the same tokens (the
conversation's next turn, a regenerate) borrows the keys and values of that prefix and prefills
only the rest. `cache_shared_system_prompt` declares a system text public: a prompt's beginning,
as far as it is that text rendered alone by the prompt's own class, is shared across tenants.

A batch of one does exactly what `model.generate` does, step for step (the tests check the
tokens are identical under greedy decoding), and eight rows cost little more than one on a
CPU and far less than eight on a GPU: the forward pass reads the weights once for all of them.

It needs a decoder-only model whose cache is the plain `DynamicCache` of per-layer
(batch, heads, length, dim) tensors; `batch.supports_batching` says whether a model qualifies,
and `ChatService` falls back to `TransformersEngine` when it does not. This module is the loop;
the batch itself (`batch`), the grouping of rows (`grouping`) and the prefill's chunks
(`prefill`) each have their own.
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from collections import deque
from typing import Any

import torch
from transformers import DynamicCache

from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.engine.batch import (
    Batch,
    Row,
    cache_layers,
    cached_length,
    keys_values,
    supports_batching,
)
from chatstream_asgi.engine.channel import Wakeups
from chatstream_asgi.engine.conversation_cache import CacheScope, ConversationCache, Layers, default_cache_bytes
from chatstream_asgi.engine.grouping import group_for
from chatstream_asgi.engine.growing_cache import GrowingLayer, growing_cache
from chatstream_asgi.engine.local import LocalEngine, LocalJob
from chatstream_asgi.engine.prefill import Prefill, PrefillChunks, first_cohort
from chatstream_asgi.engine.sampling import BatchSampling

logger = logging.getLogger(__name__)

#: The most tokens a row drafts by prompt lookup in one step (transformers' `prompt_lookup_num_tokens`).
#: A pass costs much the same whatever its few columns where the weights' reads or a pass's own
#: overhead dominate (a GPU; a small model on a CPU), so a quote goes fastest in long drafts: on
#: SmolLM2-135M and 2 CPU cores, one chat quoting its prompt wrote 59 tokens/s drafting up to 10,
#: 82 up to 16 and 102 up to 24 (`python -m bench --only draft_length`; docs/performance.md has
#: why 32 did worse), free-form text about what it writes drafting nothing (`DraftLength`).
DEFAULT_LOOKUP_TOKENS = 24
#: Renderings of the shared system prompt kept tokenized (one per prompt class and setting in use).
_PUBLIC_RENDERINGS = 16


class BatchingEngine(LocalEngine):
    """Generates with a Hugging Face causal LM, the running requests batched in each step.

    `max_batch_size` bounds the rows; admission (`num_of_concurrent_executions`) keeps the
    number of running requests within it. `conversation_cache_bytes` bounds the kept caches of
    finished generations (None: 1 GiB, or a quarter of the memory free on the device at start
    when that is less; 0: off); they are also bounded in number and dropped after a while unused
    (`ConversationCache`).
    `prefill_chunk_tokens` fixes the size of prefill chunks (None: sized to cost about 1.5
    decode steps while streams run; see `PrefillChunks`). `cache_shared_system_prompt` (None: every
    tenant's cache is its own) is a system text whose rendered beginning every tenant may share
    ("" for a template's own default system text).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = "auto",
        max_batch_size: int = 16,
        conversation_cache_bytes: int | None = None,
        prefill_chunk_tokens: int | None = None,
        cache_shared_system_prompt: str | None = None,
        prompt_lookup_num_tokens: int = DEFAULT_LOOKUP_TOKENS,
    ) -> None:
        self.chunks = PrefillChunks(prefill_chunk_tokens)
        if prompt_lookup_num_tokens < 0:
            raise ValueError(f"prompt_lookup_num_tokens must be 0 (off) or more, not {prompt_lookup_num_tokens}")
        self.prompt_lookup_num_tokens = prompt_lookup_num_tokens
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
        self.cache_shared_system_prompt = cache_shared_system_prompt
        self._public_ids: dict[tuple[str, bool], torch.Tensor] = {}  # rendered public text -> its ids
        self._start_threads(1, self._work)

    # -- the engine thread ------------------------------------------------------------------------

    def _work(self) -> None:
        with torch.inference_mode():
            self._warm_up_once(self._warm_up)
            groups: list[Batch] = []  # the running rows, by length (see the module docstring)
            prefills: deque[Prefill] = deque()  # prompts on their way in, first come first
            while True:
                arrivals = self._arrivals(wait=not groups and not prefills)
                if arrivals is None:
                    return
                try:
                    self._advance(groups, prefills, arrivals)
                except Exception as error:  # a bug here must not leave requests waiting forever
                    logger.exception("batching engine step failed")
                    running = [row.job for group in groups for row in group.rows]
                    for job in running + [p.job for p in prefills] + arrivals:
                        job.fail(error)  # (a job that already ended keeps its ending)
                    groups.clear()
                    prefills.clear()
                    self._wakeups.deliver()

    def _advance(self, groups: list[Batch], prefills: deque[Prefill], arrivals: list[LocalJob]) -> None:
        """Take in the arrivals, prefill up to one chunk's worth of prompts, then run one decode step."""
        for job in arrivals:
            job.channel.wakeups = self._wakeups
            prefill = self._start(job)
            if prefill is not None:
                prefills.append(prefill)
        self._prefill(groups, prefills)
        self._wakeups.deliver()  # first tokens go out now, not after the next step
        if groups:
            started = time.perf_counter()
            for group in groups:
                self._step(group)  # (ends by reading the sampled tokens: the device is done by then)
            self.chunks.step_took(time.perf_counter() - started)
            groups[:] = [group for group in groups if group.rows]
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

    def _start(self, job: LocalJob) -> Prefill | None:
        """Borrow what the conversation cache holds of `job`'s prepared prompt; None: it ended."""
        if job.should_stop:  # cancelled while queued for the engine: never start
            job.skip()
            return None
        prompt_ids = job.prompt_ids
        assert prompt_ids is not None  # (prepared before the job reached this thread)
        try:
            job.start_text(self.tokenizer)
            scope = CacheScope(job.params.cache_scope, job.public_tokens)
            hit = self.conversations.match(prompt_ids[0], scope)
            cache = growing_cache(self.model.config)
            for index, (keys, values) in enumerate(hit.layers if hit is not None else []):
                cache.update(keys, values, index)
        except Exception as error:  # reported to the one request it belongs to; the batch goes on
            logger.exception("preparing a prompt failed")
            job.fail(error)
            return None
        job.stats.cached_prompt_tokens = hit.length if hit is not None else 0
        return Prefill(job, prompt_ids, hit, cache, scope)

    def public_prefix(self, prompt: AbstractChatPrompt, prompt_ids: torch.Tensor) -> int:
        """How many of `prompt_ids`' first tokens are the shared system prompt as `prompt`'s class
        renders it alone (followed by an empty user turn: a chat template needs one message). They
        equal tokens anyone can render, so lending them across tenants tells nobody anything."""
        if self.cache_shared_system_prompt is None or not self.conversations.capacity_bytes:
            return 0
        alone = copy.copy(prompt)  # the same class and settings, with history lists of its own
        alone.chat_contents, alone.requester_messages, alone.responder_messages = [], [], []
        alone.set_system(self.cache_shared_system_prompt)
        alone.add_requester_msg("")
        text = alone.create_prompt()
        key = (text, alone.add_special_tokens)
        public = self._public_ids.get(key)
        if public is None:
            if len(self._public_ids) >= _PUBLIC_RENDERINGS:
                self._public_ids.clear()
            public = self._public_ids[key] = torch.tensor(self._tokenize(text, alone.add_special_tokens))
        length = min(len(public), len(prompt_ids))
        return int((public[:length] == prompt_ids[:length].cpu()).cumprod(0).sum())

    def _prefill(self, groups: list[Batch], prefills: deque[Prefill]) -> None:
        """Run the waiting prompts through the model, oldest first, up to one chunk budget; each
        one that is through sends its first token and joins a group of the batch. Prompts that
        arrived together and fit the budget go through in one forward pass."""
        # A prompt whose client left ends now wherever it waits in the line: behind a long
        # prefill it would otherwise hold its slot until that whole prefill is through.
        for prefill in [prefill for prefill in prefills if prefill.job.should_stop]:
            prefills.remove(prefill)
            prefill.job.finish()
        running = sum(len(group.rows) for group in groups)
        waiting = [prefill.remaining for prefill in prefills]
        streaming = self.chunks.bounded(running, waiting)  # (else no stream waits on this chunk's size)
        full = budget = self.chunks.budget(running, waiting)
        while prefills and budget > 0:
            cohort = first_cohort(prefills, budget)
            if len(cohort) > 1:
                for _ in cohort:
                    prefills.popleft()
                width = max(prefill.remaining for prefill in cohort)
                budget -= width * len(cohort)
                started = time.perf_counter()
                self._prefill_together(groups, prefills, cohort, width)  # (sampling waited for the device)
                if streaming:
                    self.chunks.chunk_took(width * len(cohort), time.perf_counter() - started)
                continue
            prefill = prefills[0]
            if prefill.job.should_stop:  # its client left: not one more chunk
                prefills.popleft()
                prefill.job.finish()
                continue
            if budget < min(prefill.remaining, full):  # it would go through whole next time: no stub chunk
                break
            tokens = min(prefill.remaining, budget)
            budget -= tokens
            try:
                started = time.perf_counter()
                logits = self._prefill_chunk(prefill, tokens)
                if streaming:  # timed against the decode steps: wait until the device has done it
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.chunks.chunk_took(tokens, time.perf_counter() - started)
            except Exception as error:  # reported to the one request it belongs to; the batch goes on
                logger.exception("prefill failed")
                prefills.popleft()
                prefill.job.fail(error)
                continue
            if logits is not None:  # else: more of this prompt next time
                prefills.popleft()
                self._start_row(groups, prefill, logits)

    def _prefill_together(
        self, groups: list[Batch], prefills: deque[Prefill], cohort: list[Prefill], width: int
    ) -> None:
        """Prefill the whole prompts of `cohort` in one forward pass, left-padded to `width`, then
        give each its own cache. If the pass fails, nobody can tell whose prompt failed it: they
        go back to the front of the line to be prefilled one at a time."""
        rows = len(cohort)
        ids = torch.full((rows, width), self.fallback_token_id(), dtype=torch.long, device=self.device)
        mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        for index, prefill in enumerate(cohort):
            ids[index, width - prefill.remaining :] = prefill.prompt_ids[0]
            mask[index, width - prefill.remaining :] = 1
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                cache=DynamicCache(config=self.model.config),
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception:
            logger.exception("prefilling %d prompts together failed; prefilling them one at a time", rows)
            for prefill in reversed(cohort):
                prefill.alone = True
                prefills.appendleft(prefill)
            return
        layers = cache_layers(out.cache)
        for index, prefill in enumerate(cohort):
            length = prefill.remaining
            for number, (keys, values) in enumerate(layers):
                own = slice(index, index + 1)
                prefill.cache.update(keys[own, :, -length:], values[own, :, -length:], number)  # (copied in)
            prefill.done += length
            self._start_row(groups, prefill, out.logits[index : index + 1, -1, :])

    def _start_row(self, groups: list[Batch], prefill: Prefill, logits: torch.Tensor) -> None:
        """A prompt that is through: sample its first token, send it, and join a group (or end)."""
        try:
            sampling = BatchSampling.for_row(prefill.job.params, prefill.prompt_ids[0], logits.shape[-1])
            token = sampling.sample(logits)
            ids = prefill.prompt_ids[0].tolist()
            row = Row(prefill.job, ids, prefill.hit, prefill.scope, self.prompt_lookup_num_tokens)
            running = self._emit(row, [int(token[0])])
        except Exception as error:  # reported to the one request it belongs to; the batch goes on
            logger.exception("sampling a first token failed")
            prefill.job.fail(error)
            return
        length = int(prefill.prompt_ids.shape[1])
        if running:
            group_for(groups, length, self.model.config).add(row, prefill.cache, length, token, sampling)
        else:  # (copies of its own: the cache's buffers have room to spare)
            self._keep_conversation(row, length, [(k.clone(), v.clone()) for k, v in cache_layers(prefill.cache)])

    def _prefill_chunk(self, prefill: Prefill, tokens: int) -> torch.Tensor | None:
        """The next `tokens` of the prompt through the model; the last position's logits once the
        whole prompt is through, else None."""
        chunk = prefill.prompt_ids[:, prefill.done : prefill.done + tokens]
        out = self.model(input_ids=chunk, cache=prefill.cache, use_cache=True, logits_to_keep=1)
        prefill.cache = out.cache
        prefill.done += tokens
        if prefill.remaining:
            return None
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _step(self, batch: Batch) -> None:
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
        drafts = self._drafts(batch)
        if drafts is not None and self._step_with_drafts(batch, drafts):
            return
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        assert batch.cache is not None
        lengths = [cached_length(layer) for layer in batch.cache.layers]
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
            i
            for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True))
            if self._emit(row, [token])
        ]
        self._leave(batch, keep)

    def _drafts(self, batch: Batch) -> list[list[int]] | None:
        """Each row's draft for this step, cut to a length at least half the rows reach (a row
        without one still runs every column of the step, which costs compute); None: no drafts."""
        if not self.prompt_lookup_num_tokens:
            return None
        drafts = [row.draft() for row in batch.rows]
        length = sorted((len(draft) for draft in drafts), reverse=True)[(len(drafts) - 1) // 2]
        return [draft[:length] for draft in drafts] if length else None

    def _step_with_drafts(self, batch: Batch, drafts: list[list[int]]) -> bool:
        """One step that also runs each row's draft, in one forward pass; each row keeps the
        drafted tokens the model agrees with, then the model's own next token. False: the pass
        failed, and it was undone (the caller steps the batch plainly, finding whose it was)."""
        assert batch.cache is not None and batch.sampling is not None
        rows, width = len(batch.rows), 1 + max(len(draft) for draft in drafts)
        device = batch.tokens.device
        ids = batch.tokens.repeat(1, width)  # (a row's columns past its draft run its own token: dropped after)
        for index, draft in enumerate(drafts):
            ids[index, 1 : 1 + len(draft)] = torch.tensor(draft, device=device)
        lengths = [cached_length(layer) for layer in batch.cache.layers]
        width_before = batch.mask.shape[1]
        mask = torch.cat([batch.mask, batch.mask.new_ones(rows, width)], dim=1)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=batch.positions + torch.arange(width, device=device),
                cache=batch.cache,
                use_cache=True,
                logits_to_keep=width,
            )
        except Exception:
            logger.exception("a decode step with drafts failed; stepping plainly")
            for layer, length in zip(batch.cache.layers, lengths, strict=True):
                assert isinstance(layer, GrowingLayer)
                layer.cut_to(length)
            return False
        drafted = torch.tensor([len(draft) for draft in drafts], device=device)
        try:
            taken, tokens = batch.sampling.verify(out.logits, ids[:, 1:], drafted)
        except Exception as error:  # sampling the batch at once cannot say whose fault it was
            logger.exception("batched sampling failed")
            for row in batch.rows:
                row.job.fail(error)
            batch.clear()
            return True
        batch.mask = mask
        batch.keep_step(width_before, taken + 1)
        batch.tokens = tokens.gather(1, taken[:, None])
        keep = []
        steps = zip(batch.rows, drafts, taken.tolist(), tokens.tolist(), strict=True)
        for index, (row, draft, kept, written) in enumerate(steps):
            row.draft_length.took(len(draft), kept)
            before = row.job.stats.completion_tokens
            if self._emit(row, written[: kept + 1]):
                keep.append(index)
            row.job.stats.drafted_tokens += min(kept, row.job.stats.completion_tokens - before)
        self._leave(batch, keep)
        if batch.rows:
            batch.compact()
        return True

    def _leave(self, batch: Batch, keep: list[int]) -> None:
        """Drop the rows not in `keep`, keeping the cache of each for the conversation's next turn."""
        if self.conversations.capacity_bytes and len(keep) < len(batch.rows):
            staying = set(keep)
            for index, row in enumerate(batch.rows):
                if index not in staying:
                    self._keep_conversation(row, *batch.row_cache(index, len(row.ids)))
        batch.keep(keep)

    def _keep_conversation(self, row: Row, length: int, layers: Layers) -> None:
        """Keep the keys and values of a finished row's first `length` tokens."""
        self.conversations.put(torch.tensor(row.ids[:length]), layers, scope=row.scope, extends=row.hit)

    def _forward_apart(self, batch: Batch, lengths: list[int]) -> tuple[torch.Tensor, DynamicCache] | None:
        """After a batched decode step failed, run each row's step alone: a row whose own step
        fails fails; the others go on, in a batch of their own logits and cache. None: no row
        is left. The cache is first cut back to `lengths`, undoing the failed step's writes."""
        assert batch.cache is not None
        for layer, length in zip(batch.cache.layers, lengths, strict=True):
            assert isinstance(layer, GrowingLayer)
            layer.cut_to(length)
        keep: list[int] = []
        logits: list[torch.Tensor] = []
        caches: list[DynamicCache] = []
        for index, row in enumerate(batch.rows):
            alone = growing_cache(self.model.config)
            for number, layer in enumerate(batch.cache.layers):
                keys, values = keys_values(layer)
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
        merged = growing_cache(self.model.config)
        for number in range(len(lengths)):
            parts = [keys_values(cache.layers[number]) for cache in caches]
            merged.update(torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]), number)
        selected = torch.tensor(keep, device=batch.mask.device)
        batch.mask = batch.mask[selected]
        batch.positions = batch.positions[selected]
        batch.tokens = batch.tokens[selected]
        batch.rows = [batch.rows[i] for i in keep]
        assert batch.sampling is not None
        batch.sampling = batch.sampling.select(selected)
        return torch.cat(logits), merged

    def _emit(self, row: Row, tokens: list[int]) -> bool:
        """Hand one step's tokens to its job (drafted ones it kept, then the model's own); False
        (and the job finished) when the row is done. Nothing past an end token, the reply's
        limit or a stop string (`accept` cuts the text there) reaches the client."""
        job = row.job
        end = next((i for i, token in enumerate(tokens) if token in self._eos), len(tokens))
        written = tokens[:end][: job.params.max_new_tokens - job.stats.completion_tokens]
        if written:
            job.accept(written)
            row.ids.extend(written)
        if end < len(tokens) and len(written) == end:  # the end token, within the limit
            if not written:
                job.decode_steps += 1
            job.finish("stop")
            return False
        if job.should_stop or job.stats.completion_tokens >= job.params.max_new_tokens:
            job.finish()
            return False
        return True
