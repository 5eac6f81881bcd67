"""`OpenAIEngine`: generations streamed from any OpenAI-compatible server (vLLM, TGI, llama.cpp's
server, or another chatstream-asgi), with this package's sessions, admission and outcomes in front.

The upstream stream is read by a task of the request's own, so cancelling the generation
cancels that task, which closes the HTTP stream: the upstream server sees its client leave and
stops generating, just as our own server does. Upstream failures become `GenerationFailed`
with 502 (an error or a broken stream) or 504 (no answer within `timeout`); an upstream that
says it is busy (429) stays a 429, with the seconds of its `Retry-After` (1 without one), so the
front's client backs off as the upstream asked.

The front partitions the upstream's prefix cache as its own is partitioned: each request carries
its tenant (`GenerationParams.cache_scope`, a hash naming the session, API key or address and the
client's salt) as vLLM's `cache_salt`, which vLLM and chatstream-asgi honour, so the front's
users, who reach the upstream as one client, cannot time one another's prompts there. An
upstream that refuses fields it does not know (OpenAI's own API) takes `cache_salt=False`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import httpx

from chatstream_asgi.core.detokenize import StopStringFilter
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.engine.base import Generation, GenerationFailed, GenerationStats
from chatstream_asgi.engine.channel import TextChannel
from chatstream_asgi.log import request_logger

logger = request_logger(__name__)

# Seconds `/ready` waits for the upstream's answer.
_PROBE_TIMEOUT = 2.0


class _RemoteGeneration:
    #: The upstream may fail before its first byte (unreachable, refusing): the response head
    #: waits for the first text, so such a failure is answered with its own status.
    defers_head = True

    def __init__(self) -> None:
        self.stats = GenerationStats()
        self.channel = TextChannel(from_thread=False)
        self.scope = anyio.CancelScope()

    async def next_text(self, timeout: float) -> str | None:
        return await self.channel.receive(timeout)

    def cancel(self) -> None:
        if not self.channel.ended:
            self.stats.finish_reason = "cancelled"
            self.scope.cancel()


class OpenAIEngine:
    """Streams chat completions from `base_url` (e.g. "http://host:8000/v1") as model `model`;
    `cache_salt` sends each request's tenant as vLLM's `cache_salt` (module docstring)."""

    ready = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        cache_salt: bool = True,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, not {timeout}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name_or_path = model
        self.timeout = timeout
        self.cache_salt = cache_salt
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def generate(
        self, prompt: AbstractChatPrompt, params: GenerationParams, *, context_len: int
    ) -> AsyncIterator[Generation]:
        """Stream the reply to `prompt` from the upstream server while the context is open."""
        generation = _RemoteGeneration()
        body: dict[str, Any] = {
            "model": self.model,
            "messages": prompt.to_messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        stop = list(params.stop) + prompt.generation_stop_strs()
        if stop:
            body["stop"] = stop[:4]  # OpenAI's limit; the filter below applies them all
        if params.seed is not None:
            body["seed"] = params.seed
        if self.cache_salt and params.cache_scope:
            body["cache_salt"] = params.cache_scope
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._pump, generation, body, StopStringFilter(stop))
            try:
                yield generation
            finally:
                generation.cancel()

    async def answers(self) -> bool:
        """Whether the upstream answers `GET /models` now (what `/ready` reports): a front whose
        upstream is down must not be sent traffic."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        try:
            response = await self._client.get(
                f"{self.base_url}/models", headers=self._headers, timeout=min(self.timeout, _PROBE_TIMEOUT)
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def close(self) -> None:
        """Connections close with the process; `aclose()` closes them sooner."""

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _pump(self, generation: _RemoteGeneration, body: dict[str, Any], stop: StopStringFilter) -> None:
        failure: GenerationFailed | None = None
        try:
            with generation.scope:
                await self._read_stream(generation, body, stop)
        except httpx.TimeoutException as error:
            failure = GenerationFailed(
                f"the upstream server at {self.base_url} did not answer in time", status_code=504
            )
            failure.__cause__ = error
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as error:
            failure = GenerationFailed(f"the upstream server at {self.base_url} failed: {error!r}", status_code=502)
            failure.__cause__ = error
        except GenerationFailed as error:
            failure = error
        if failure is not None:
            logger.warning("remote generation failed: %s", failure)
            generation.stats.finish_reason = "error"
        generation.channel.end(failure)

    async def _read_stream(self, generation: _RemoteGeneration, body: dict[str, Any], stop: StopStringFilter) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        stats = generation.stats
        url = f"{self.base_url}/chat/completions"
        async with self._client.stream("POST", url, json=body, headers=self._headers) as response:
            if response.status_code == 429:
                retry_after = _retry_after_seconds(response.headers.get("retry-after"))
                raise GenerationFailed(
                    f"the upstream server is busy (429): retry in {retry_after:g} s",
                    status_code=429,
                    retry_after=retry_after,
                )
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise GenerationFailed(
                    f"the upstream server answered {response.status_code}: {detail}", status_code=502
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise GenerationFailed(f"the upstream server reported: {chunk['error']}", status_code=502)
                if usage := chunk.get("usage"):
                    stats.prompt_tokens = usage.get("prompt_tokens", stats.prompt_tokens)
                    stats.completion_tokens = usage.get("completion_tokens", stats.completion_tokens)
                for choice in chunk.get("choices", []):
                    if content := choice.get("delta", {}).get("content"):
                        stats.completion_tokens += 1  # a chunk per token; the usage chunk corrects it
                        generation.channel.put(stop.feed(content))
                        if stop.stopped:
                            stats.finish_reason = "stop"
                            return  # closing the stream stops the upstream generation
                    if choice.get("finish_reason"):
                        stats.finish_reason = choice["finish_reason"]
        generation.channel.put(stop.flush())


def _retry_after_seconds(value: str | None) -> float:
    """The wait a `Retry-After` header asks for (seconds, or an HTTP date), at least 1 s; 1 s
    when there is none or it cannot be read."""
    if value is None:
        return 1.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 1.0
    return max(1.0, seconds) if math.isfinite(seconds) else 1.0
