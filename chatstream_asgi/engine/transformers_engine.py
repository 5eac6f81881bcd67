"""A local Hugging Face model, generating on long-lived threads the engine owns.

Threads are made once, not per request: CUDA graphs and compiled models keep thread-local
state, and a fixed set of threads is also a fixed amount of memory. Each thread runs
`model.generate` for one request at a time under `torch.inference_mode()`. The prompt is
rendered, fitted to the context and tokenized on that thread too, so a long history never
costs the event loop anything.

Cancellation is a `threading.Event` read by a `StoppingCriteria` after every decode step,
which is as soon as `generate` can stop: the step in flight finishes, no further one starts.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from chatstream_asgi.detokenize import IncrementalDetokenizer, StopStringFilter
from chatstream_asgi.engine.base import Generation, GenerationFailed, GenerationStats
from chatstream_asgi.engine.channel import TextChannel
from chatstream_asgi.params import GenerationParams
from chatstream_asgi.prompt import AbstractChatPrompt, fit_prompt

logger = logging.getLogger(__name__)


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


class _Job:
    """One request's generation: what to generate, and the flags both sides share."""

    def __init__(self, prompt: AbstractChatPrompt, params: GenerationParams, context_len: int) -> None:
        self.prompt = prompt
        self.params = params
        self.context_len = context_len
        self.channel = TextChannel()
        self.stats = GenerationStats()
        self.cancel_requested = threading.Event()
        self.stop_string_seen = False
        self.decode_steps = 0
        self._steps_at_cancel: int | None = None

    # The loop's view (the `Generation` protocol).

    async def next_text(self, timeout: float) -> str | None:
        return await self.channel.receive(timeout)

    def cancel(self) -> None:
        if not self.cancel_requested.is_set() and not self.channel.ended:
            self._steps_at_cancel = self.decode_steps
            self.cancel_requested.set()

    # The thread's bookkeeping.

    def count_step(self) -> None:
        self.decode_steps += 1
        if self._steps_at_cancel is not None:
            self.stats.steps_after_cancel = self.decode_steps - self._steps_at_cancel

    @property
    def should_stop(self) -> bool:
        return self.stop_string_seen or self.cancel_requested.is_set() or self.channel.loop_gone


class _StopWhenAsked(StoppingCriteria):
    """Ends generation after the current step once the job is cancelled or hit a stop string."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        flag = self._job.should_stop
        return torch.full((input_ids.shape[0],), flag, device=input_ids.device, dtype=torch.bool)  # type: ignore[return-value]


class _DeltaStreamer(BaseStreamer):
    """Receives each new token from `generate`, turns it into safe text, hands it to the loop."""

    def __init__(self, job: _Job, tokenizer: Any, stop: list[str]) -> None:
        self._job = job
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._filter = StopStringFilter(stop)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        job = self._job
        job.count_step()
        if job.stop_string_seen:
            return
        token_ids = value.reshape(-1).tolist()
        job.stats.completion_tokens += len(token_ids)
        if job.cancel_requested.is_set():
            return  # nobody will read it: skip the decode too
        text = self._filter.feed(self._detokenizer.add(token_ids))
        job.stop_string_seen = self._filter.stopped
        job.channel.put(text)

    def end(self) -> None:
        if not self._job.stop_string_seen:
            tail = self._filter.feed(self._detokenizer.flush())
            self._job.channel.put(tail + self._filter.flush())


class TransformersEngine:
    """Generates with a Hugging Face causal LM on `workers` threads of its own."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = "auto",
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.device = resolve_device(device)
        # A model spread over devices by accelerate (device_map) must stay where it is.
        if getattr(model, "hf_device_map", None) is None and model.device != self.device:
            model = model.to(self.device)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"chatstream-engine-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device | None = "auto", workers: int = 1
    ) -> TransformersEngine:
        """Load a model and tokenizer saved with `save_pretrained` (or a hub id, where a hub is reachable)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        return cls(model, tokenizer, device=device, workers=workers)

    @property
    def ready(self) -> bool:
        """True once a first generation (the warm-up) has run."""
        return self._ready.is_set()

    @property
    def name_or_path(self) -> str:
        """Where the model came from, as transformers recorded it."""
        return str(getattr(self.model, "name_or_path", "") or "")

    @asynccontextmanager
    async def generate(
        self, prompt: AbstractChatPrompt, params: GenerationParams, *, context_len: int
    ) -> AsyncIterator[Generation]:
        """Queue the reply to `prompt` for the next free engine thread; on exit, stop it and wait
        until the thread has (one decode step at most)."""
        job = _Job(prompt, params, context_len)
        self._jobs.put(job)
        try:
            yield job
        finally:
            job.cancel()
            with anyio.CancelScope(shield=True):
                try:
                    while await job.next_text(timeout=60.0) is not None:
                        pass
                except GenerationFailed:
                    pass  # the caller already saw it, or left before it could matter

    def close(self) -> None:
        """Let the threads exit once they finish what they run."""
        for _ in self._threads:
            self._jobs.put(None)

    # -- the engine threads ----------------------------------------------------------------

    def _work(self) -> None:
        with torch.inference_mode():
            if not self._ready.is_set():
                try:
                    self._warm_up()
                except Exception:  # the engine stays not-ready (/ready says 503); requests report their own errors
                    logger.exception("engine warm-up failed")
            while (job := self._jobs.get()) is not None:
                self._generate(job)

    def _warm_up(self) -> None:
        """One tiny generation, so the first user does not pay for lazy initialisation."""
        inputs = torch.tensor([[self._fallback_token_id()]], device=self.device)
        config = self._generation_config(GenerationParams(max_new_tokens=1, temperature=0))
        self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
        self._ready.set()

    def _generate(self, job: _Job) -> None:
        if job.should_stop:  # cancelled while waiting for a thread: never start
            job.stats.finish_reason = "cancelled"
            job.channel.end()
            return
        try:
            input_ids = self._encode_prompt(job)
            job.stats.prompt_tokens = input_ids.shape[1]
            stop = list(job.params.stop) + list(job.prompt.get_stop_strs() or [])
            if job.params.seed is not None:
                torch.manual_seed(job.params.seed)
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation_config(job.params),
                streamer=_DeltaStreamer(job, self.tokenizer, stop),
                stopping_criteria=StoppingCriteriaList([_StopWhenAsked(job)]),
            )
        except Exception as error:  # reported to the one request it belongs to; the engine goes on
            logger.exception("generation failed")
            job.stats.finish_reason = "error"
            failure = GenerationFailed(f"{type(error).__name__}: {error}")
            failure.__cause__ = error  # for the log of whoever reads it
            job.channel.end(failure)
            return
        if job.cancel_requested.is_set():
            job.stats.finish_reason = "cancelled"
        elif not job.stop_string_seen and job.stats.completion_tokens >= job.params.max_new_tokens:
            job.stats.finish_reason = "length"
        else:
            job.stats.finish_reason = "stop"
        job.channel.end()

    def _encode_prompt(self, job: _Job) -> torch.Tensor:
        prompt = job.prompt
        prompt.set_tokenizer(self.tokenizer)
        budget = job.context_len - job.params.max_new_tokens

        def count_tokens(text: str) -> int:
            return len(self._tokenize(text, prompt.add_special_tokens))

        ids = self._tokenize(fit_prompt(prompt, count_tokens, budget), prompt.add_special_tokens)
        # The newest request alone is over budget: keep its end, which the reply follows.
        ids = ids[-budget:]
        return torch.tensor([ids], device=self.device)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return ids

    def _generation_config(self, params: GenerationParams) -> GenerationConfig:
        config: GenerationConfig = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = params.max_new_tokens
        config.max_length = None
        config.repetition_penalty = params.repetition_penalty
        config.do_sample = params.temperature > 0
        if config.do_sample:
            config.temperature = params.temperature
            config.top_k = params.top_k or None
            config.top_p = params.top_p
        else:  # greedy: sampling knobs would only draw warnings
            config.temperature = config.top_k = config.top_p = None
        if config.pad_token_id is None:
            config.pad_token_id = self._fallback_token_id()
        return config

    def _fallback_token_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.tokenizer.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0
