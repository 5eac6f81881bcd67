"""`TransformersEngine`: one `model.generate` per slot, each on an engine thread of its own.

The fallback for models the batching engine cannot drive (encoder-decoder models, sliding-window
or recurrent caches; see `batching.py`), and the reference the batching engine is checked
against. Threads are made once, not per request: CUDA graphs and compiled models keep
thread-local state. Each thread runs `model.generate` for one request at a time under
`torch.inference_mode()`; the prompt was rendered, fitted to the context and tokenized before, on
the engine's preparing thread (`LocalEngine`), so a long history costs neither the event loop nor
a running generation anything.

Cancellation is a `threading.Event` read by a `StoppingCriteria` after every decode step,
which is as soon as `generate` can stop: the step in flight finishes, no further one starts.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.engine.local import LocalEngine, LocalJob, resolve_device

logger = logging.getLogger(__name__)

__all__ = ["TransformersEngine", "resolve_device"]


class _StopWhenAsked(StoppingCriteria):
    """Ends generation after the current step once the job is cancelled or hit a stop string."""

    def __init__(self, job: LocalJob) -> None:
        self._job = job

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        flag = self._job.should_stop
        return torch.full((input_ids.shape[0],), flag, device=input_ids.device, dtype=torch.bool)  # type: ignore[return-value]


class _JobStreamer(BaseStreamer):
    """Hands each new token from `generate` to the job (which makes it safe text for the loop)."""

    def __init__(self, job: LocalJob) -> None:
        self._job = job
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        self._job.accept(value.reshape(-1).tolist())

    def end(self) -> None:
        """`finish` runs once generate() has returned."""


class TransformersEngine(LocalEngine):
    """Generates with a Hugging Face causal LM: `workers` threads, one `model.generate` each."""

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
        super().__init__(model, tokenizer, device=device)
        self._start_threads(workers, self._work)

    def _work(self) -> None:
        with torch.inference_mode():
            self._warm_up_once(self._warm_up)
            while (job := self._jobs.get()) is not None:
                self._generate(job)

    def _warm_up(self) -> None:
        inputs = torch.tensor([[self.fallback_token_id()]], device=self.device)
        config = self._generation_config(GenerationParams(max_new_tokens=1, temperature=0))
        self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)

    def _generate(self, job: LocalJob) -> None:
        if job.should_stop:  # cancelled while waiting for a thread: never start
            job.skip()
            return
        input_ids = job.prompt_ids
        assert input_ids is not None  # (prepared before the job reached this thread)
        try:
            job.start_text(self.tokenizer)
            if job.params.seed is not None:
                torch.manual_seed(job.params.seed)
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation_config(job.params),
                streamer=_JobStreamer(job),
                stopping_criteria=StoppingCriteriaList([_StopWhenAsked(job)]),
            )
        except Exception as error:  # reported to the one request it belongs to; the engine goes on
            logger.exception("generation failed")
            job.fail(error)
            return
        job.finish()

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
            config.pad_token_id = self.fallback_token_id()
        return config
