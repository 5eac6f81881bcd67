"""What the two local-model engines share: the job a request becomes, and the engine's frame.

A `LocalJob` carries one request from the event loop to an engine thread and its text back:
the prompt and parameters in, tokens turned into safe text (UTF-8 whole, stop strings cut) on
the thread, a `TextChannel` to the loop. `LocalEngine` owns the model, places it on its device,
and gives every engine the same `generate()` context: prepare the prompt, queue the job, and on
exit cancel it and wait until the thread let go.

The prompt is rendered and tokenized on a preparing thread of the engine's own before the job
reaches an engine thread, never on one: an engine thread runs every decode step of every chat,
and a long tokenization there stalled them all. What is tokenized is bounded first
(`keep_newest_text`): only the newest characters and messages that can reach the model, however
long the request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import torch

from chatstream_asgi.core.detokenize import IncrementalDetokenizer, StopStringFilter
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import AbstractChatPrompt, fit_prompt, keep_newest_text
from chatstream_asgi.engine.base import Generation, GenerationFailed, GenerationStats
from chatstream_asgi.engine.channel import TextChannel
from chatstream_asgi.log import request_logger

logger = request_logger(__name__)

# Seconds a cancelled generation may take to stop (one decode step, or a long prefill) before
# its slot is freed regardless.
_STOP_GRACE = 120.0
# Seconds `close()` waits for the threads to leave: they are idle, or end a step, long before.
_CLOSE_WAIT = 10.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`"auto"` (or None) picks cuda, then mps, then cpu; anything else is taken as given."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


class LocalJob:
    """One request's generation on a local model; read on the loop, written on the engine thread."""

    def __init__(self, prompt: AbstractChatPrompt, params: GenerationParams, context_len: int) -> None:
        self.prompt = prompt
        self.params = params
        self.context_len = context_len
        self.prompt_ids: torch.Tensor | None = None  # (1, n), prepared before the job is queued
        #: Of `prompt_ids`' first tokens, how many any tenant may share (see `public_prefix`).
        self.public_tokens = 0
        self.channel = TextChannel()
        self.stats = GenerationStats()
        self.cancel_requested = threading.Event()
        self.stop_string_seen = False
        self.decode_steps = 0
        self._steps_at_cancel: int | None = None
        self._detokenizer: IncrementalDetokenizer | None = None
        self._filter: StopStringFilter | None = None
        self._claim = threading.Lock()  # who has the job: the preparing thread (`take`) or nobody (`abandon`)
        self._taken = False
        self._abandoned = False

    # -- the loop's view (the `Generation` protocol) -----------------------------------------

    async def next_text(self, timeout: float) -> str | None:
        return await self.channel.receive(timeout)

    def cancel(self) -> None:
        if not self.cancel_requested.is_set() and not self.channel.ended:
            self._steps_at_cancel = self.decode_steps
            self.cancel_requested.set()

    def abandon(self) -> bool:
        """As its request leaves: end the job now if no thread has taken it yet (True), so that
        nothing waits for a preparation nobody needs (the preparing thread may be busy with another
        prompt); the preparing thread then drops it. False: a thread has it, and must let go."""
        with self._claim:
            if self._taken:
                return False
            self._abandoned = True
        self.stats.finish_reason = "cancelled"
        return True

    # -- the engine thread's side ---------------------------------------------------------------

    def take(self) -> bool:
        """Claim the job for the preparing thread; False when its request already left (`abandon`)."""
        with self._claim:
            if self._abandoned:
                return False
            self._taken = True
            return True

    @property
    def should_stop(self) -> bool:
        """Cancelled, stopped by a stop string, or nobody left to read."""
        return self.stop_string_seen or self.cancel_requested.is_set() or self.channel.loop_gone

    def start_text(self, tokenizer: Any) -> None:
        """Prepare detokenization and stop strings (the server's, the request's, the prompt format's)."""
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._filter = StopStringFilter(list(self.params.stop) + self.prompt.generation_stop_strs())

    def accept(self, token_ids: Iterable[int]) -> None:
        """Take the tokens of one decode step: count the step, send the text they complete."""
        assert self._detokenizer is not None and self._filter is not None
        self.decode_steps += 1
        if self._steps_at_cancel is not None:
            self.stats.steps_after_cancel = self.decode_steps - self._steps_at_cancel
        if self.stop_string_seen:
            return
        token_ids = list(token_ids)
        self.stats.completion_tokens += len(token_ids)
        if self.cancel_requested.is_set():
            return  # nobody will read it: skip the decode too
        text = self._filter.feed(self._detokenizer.add(token_ids))
        self.stop_string_seen = self._filter.stopped
        self.channel.put(text)

    def finish(self, reason: str | None = None) -> None:
        """Send the held-back tail, record why generation ended, and close the channel."""
        assert self._detokenizer is not None and self._filter is not None
        if not self.stop_string_seen and not self.cancel_requested.is_set():
            tail = self._filter.feed(self._detokenizer.flush())
            self.channel.put(tail + self._filter.flush())
        if self.cancel_requested.is_set():
            self.stats.finish_reason = "cancelled"
        elif reason is not None:
            self.stats.finish_reason = reason
        elif not self.stop_string_seen and self.stats.completion_tokens >= self.params.max_new_tokens:
            self.stats.finish_reason = "length"
        else:
            self.stats.finish_reason = "stop"
        self.channel.end()

    def fail(self, error: Exception) -> None:
        """End the generation with `error`, reported to the request it belongs to."""
        if self.channel.ended:  # already finished: its reader must see that, not a later failure
            return
        self.stats.finish_reason = "error"
        failure = GenerationFailed(f"{type(error).__name__}: {error}")
        failure.__cause__ = error  # for the log of whoever reads it
        self.channel.end(failure)

    def skip(self) -> None:
        """End a job cancelled before it started: it never reaches the model."""
        self.stats.finish_reason = "cancelled"
        self.channel.end()


class LocalEngine:
    """A Hugging Face causal LM on this process's device, generating on threads of its own."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str | torch.device | None = "auto") -> None:
        self.device = resolve_device(device)
        # A model spread over devices by accelerate (device_map) must stay where it is.
        if getattr(model, "hf_device_map", None) is None and model.device != self.device:
            model = model.to(self.device)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self._incoming: queue.SimpleQueue[LocalJob | None] = queue.SimpleQueue()  # to be prepared
        self._jobs: queue.SimpleQueue[LocalJob | None] = queue.SimpleQueue()  # prepared, for the engine
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        # No token covers more characters than the longest token string spells (a byte-level
        # token spells one character per byte): what bounds the characters a context can hold.
        self.longest_token = max((len(token) for token in tokenizer.get_vocab()), default=1)

    def _start_threads(self, count: int, target: Any) -> None:
        """Start `count` engine threads running `target`, and the thread preparing their prompts."""
        self._threads = [
            threading.Thread(target=target, name=f"chatstream-engine-{i}", daemon=True) for i in range(count)
        ]
        self._threads.append(threading.Thread(target=self._prepare_arrivals, name="chatstream-prepare", daemon=True))
        for thread in self._threads:
            thread.start()

    def _prepare_arrivals(self) -> None:
        """The preparing thread: render and tokenize the prompts that arrive, then hand them on.

        Prompts that arrived together are handed on together (the batching engine prefills them
        in one pass). On None (close), it tells each engine thread to leave, and leaves."""
        while True:
            arrivals: list[LocalJob] = []
            closing = False
            try:
                job = self._incoming.get()
                while True:
                    if job is None:
                        closing = True
                        break
                    arrivals.append(job)
                    job = self._incoming.get_nowait()
            except queue.Empty:
                pass
            for job in [job for job in arrivals if self._prepare(job)]:
                self._jobs.put(job)
            if closing:
                for _ in range(len(self._threads) - 1):
                    self._jobs.put(None)
                return

    def _prepare(self, job: LocalJob) -> bool:
        """Give `job` its prompt's ids; False when it ended instead (cancelled, or it failed)."""
        if not job.take():  # its request left while it waited here: nobody reads it
            return False
        if job.should_stop:  # cancelled while waiting: never prepared, never started
            job.skip()
            return False
        try:
            job.prompt_ids = self.encode_prompt(job)
            job.public_tokens = self.public_prefix(job.prompt, job.prompt_ids[0])
        except Exception as error:  # reported to the one request it belongs to; the others go on
            logger.exception("preparing a prompt failed")
            job.fail(error)
            return False
        return True

    def public_prefix(self, prompt: AbstractChatPrompt, prompt_ids: torch.Tensor) -> int:
        """How many of `prompt_ids`' first tokens every tenant may share: none, unless an engine
        with a shared cache says otherwise. Counted here, on the preparing thread, since it may
        render and tokenize."""
        return 0

    @property
    def ready(self) -> bool:
        """True once the warm-up generation has run."""
        return self._ready.is_set()

    @property
    def name_or_path(self) -> str:
        """Where the model came from, as transformers recorded it."""
        return str(getattr(self.model, "name_or_path", "") or "")

    @asynccontextmanager
    async def generate(
        self, prompt: AbstractChatPrompt, params: GenerationParams, *, context_len: int
    ) -> AsyncIterator[Generation]:
        """Queue the reply to `prompt` (its preparation, then the engine's thread); on exit, stop
        it and wait until the thread has (one decode step at most)."""
        job = LocalJob(prompt, params, context_len)
        self._incoming.put(job)
        try:
            yield job
        finally:
            job.cancel()
            if not job.abandon():  # a thread has it: wait until it lets go
                await self._wait_until_stopped(job)

    async def _wait_until_stopped(self, job: LocalJob) -> None:
        """Wait for the threads to let go of a cancelled `job` (one decode step at most)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_GRACE) as waited:
            try:
                while await job.next_text(timeout=_STOP_GRACE) is not None:
                    pass
            except GenerationFailed:
                pass  # the caller already saw it, or left before it could matter
        if waited.cancelled_caught:  # only a stuck model or a dead engine thread gets here
            logger.error("the engine did not stop within %s s of a cancel; freeing the slot anyway", _STOP_GRACE)

    def close(self) -> None:
        """Let the threads exit once they finish what they run, and wait for them (bounded).

        Blocking, so call it off the event loop. Waiting matters: a daemon thread still inside a
        torch kernel when the interpreter exits aborts the process ("terminate called without an
        active exception") instead of letting it exit 0.
        """
        self._incoming.put(None)  # (the preparing thread passes it on to each engine thread)
        deadline = time.monotonic() + _CLOSE_WAIT
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _warm_up_once(self, warm_up: Any) -> None:
        """Run `warm_up` (a tiny generation) so the first user does not pay for lazy set-up."""
        if self._ready.is_set():
            return
        try:
            warm_up()
        except Exception:  # the engine stays not-ready (/ready says 503); requests report their own errors
            logger.exception("engine warm-up failed")
            return
        self._ready.set()

    def encode_prompt(self, job: LocalJob) -> torch.Tensor:
        """The job's prompt as input ids (1, n): rendered, oldest turns cut to fit the context.

        Blocking (the preparing thread's). Before rendering, the text is cut to the newest
        `budget * longest_token` characters in at most `budget` messages, at least `budget`
        tokens: the ids kept are the ones the whole text would have ended with, and a megabyte
        costs what a context does."""
        prompt = job.prompt
        prompt.set_tokenizer(self.tokenizer)
        budget = job.context_len - job.params.max_new_tokens
        keep_newest_text(prompt, budget, self.longest_token)

        def count_tokens(text: str) -> int:
            return len(self._tokenize(text, prompt.add_special_tokens))

        ids = self._tokenize(fit_prompt(prompt, count_tokens, budget), prompt.add_special_tokens)
        # The newest request alone is over budget: keep its end, which the reply follows.
        ids = ids[-budget:]
        job.stats.prompt_tokens = len(ids)
        return torch.tensor([ids], device=self.device)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return ids

    def fallback_token_id(self) -> int:
        """A token id to pad with: pad, else end, else beginning of sequence, else 0."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.tokenizer.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0
