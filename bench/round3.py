"""Issue 21's figures: prompt lookup (`lookup`) and long conversations (`growth`), each beside
`model.generate` measured in the same run.

`lookup`: replies that quote their prompt (repeat a paragraph, edit one word of it) and a
free-form one, greedy, one chat and eight, over HTTP, beside plain `model.generate`, beside
`model.generate(prompt_lookup_num_tokens=10)` (transformers' own prompt lookup) and beside this
server with prompt lookup off. Tokens/s count what the model wrote until it stopped by itself
(or hit the limit), since a real model ends its quote where the quote ends.

`growth`: 1, 4 and 8 chats whose prompts are about 100, 1,000 and 4,000 tokens: each chat's
decode tokens/s (its tokens after the first ÷ the time between its first and last chunk) and
its first byte, beside `model.generate` on a static batch of the same prompts (decode: the time
of N tokens less the time of 1; first byte: the time of 1).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import client
from bench.harness import running_server
from chatstream_asgi.engine import resolve_device

PARAGRAPH = (
    "The river runs past the old mill every morning, carrying leaves and the smell of rain down to "
    "the town. Children wait on the bridge to watch the boats, and the baker opens his window when "
    "the bells ring at seven. In the evening the river is quiet again, and the lamps along the bank "
    "light up one by one while the last boats come home."
)
LOOKUP_PROMPTS = {
    "quote": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "edit": f"Rewrite the following paragraph, replacing the word 'river' with 'stream':\n\n{PARAGRAPH}",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


class _Local:
    """The model in this process: what every server figure is held against."""

    def __init__(self, path: Path) -> None:
        import os

        device = resolve_device(os.environ.get("BENCH_DEVICE", "auto"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval().to(device)
        self.device = device

    def ids(self, texts: list[str]) -> torch.Tensor:
        """The chat-template ids of one-turn chats, left-padded to one batch (same-length texts here)."""
        rendered = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.device)

    def generate(
        self, ids: torch.Tensor, new_tokens: int, *, until_end: bool = True, **settings: Any
    ) -> tuple[int, float]:
        """(tokens written per row, seconds) of greedy `model.generate`; `until_end=False` writes
        exactly `new_tokens`."""
        mask = (ids != (self.tokenizer.pad_token_id or 0)).long() if ids.shape[0] > 1 else torch.ones_like(ids)
        extra = {} if until_end else {"min_new_tokens": new_tokens}
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **extra, **settings
            )
            seconds = time.perf_counter() - start
        written = out[0, ids.shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        ends = set(eos if isinstance(eos, list) else [eos])
        count = next((i + 1 for i, token in enumerate(written) if token in ends), len(written))
        return count, seconds


async def _chats(url: str, texts: list[str], new_tokens: int) -> list[client.Reply]:
    replies = [client.Reply(started=0.0) for _ in texts]
    async with anyio.create_task_group() as group:
        for text, reply in zip(texts, replies, strict=True):
            body = client.body("greedy", new_tokens, text)
            group.start_soon(lambda b=body, r=reply: client.chat(url, b, reply=r))
    return replies


async def _finished(url: str, count: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url) as http:
        finished: list[dict[str, Any]] = (await http.get("/bench/finished")).json()
    return finished[-count:]


def bench_lookup(path: Path, new_tokens: int, reps: int) -> dict[str, Any]:
    """Tokens/s of one chat (and eight) on quoting and free-form prompts, with prompt lookup and
    without, beside `model.generate` with and without transformers' prompt lookup."""
    local = _Local(path)
    local.generate(local.ids(["warm up"]), 4)
    results: dict[str, Any] = {}
    for name, text in LOOKUP_PROMPTS.items():
        ids = local.ids([text])
        plain = [local.generate(ids, new_tokens) for _ in range(reps)]
        lookup = [local.generate(ids, new_tokens, prompt_lookup_num_tokens=10) for _ in range(reps)]
        batch = local.ids([text] * 8)
        static8 = [local.generate(batch, new_tokens) for _ in range(reps)] if name == "quote" else []
        results[name] = {
            "tokens": plain[0][0],
            "generate_tokens_per_second": statistics.median(t / s for t, s in plain),
            "generate_lookup_tokens_per_second": statistics.median(t / s for t, s in lookup),
        }
        if static8:
            results[name]["static_batch8_tokens_per_second"] = statistics.median(8 * t / s for t, s in static8)
    for label, setting in (("server", -1), ("server_lookup_off", 0)):
        settings = {"concurrency": 8, "queue": 8, "max_new_tokens": new_tokens, "prompt_lookup": setting}
        with running_server(path, **settings) as (url, _):
            anyio.run(_chats, url, ["warm up"], 4)
            for name, text in LOOKUP_PROMPTS.items():
                rates, drafted = [], []
                for _ in range(reps):
                    (reply,) = anyio.run(_chats, url, [text], new_tokens)
                    (done,) = anyio.run(_finished, url, 1)
                    rates.append(done["completion_tokens"] / reply.seconds)
                    drafted.append(done["drafted_tokens"] / max(1, done["completion_tokens"]))
                results[name][f"{label}_tokens_per_second"] = statistics.median(rates)
                results[name][f"{label}_drafted_share"] = statistics.median(drafted)
                if name == "quote":
                    eight = []
                    for _ in range(reps):
                        started = time.perf_counter()
                        anyio.run(_chats, url, [text] * 8, new_tokens)
                        seconds = time.perf_counter() - started
                        eight.append(sum(d["completion_tokens"] for d in anyio.run(_finished, url, 8)) / seconds)
                    results[name][f"{label}_8_chats_tokens_per_second"] = statistics.median(eight)
    for result in results.values():
        result["ratio_to_generate"] = result["server_tokens_per_second"] / result["generate_tokens_per_second"]
        result["ratio_to_generate_lookup"] = (
            result["server_tokens_per_second"] / result["generate_lookup_tokens_per_second"]
        )
        result["ratio_to_lookup_off"] = (
            result["server_tokens_per_second"] / result["server_lookup_off_tokens_per_second"]
        )
    quote = results["quote"]
    quote["8_chats_ratio_to_static_batch8"] = (
        quote["server_8_chats_tokens_per_second"] / quote["static_batch8_tokens_per_second"]
    )
    return results


def _prompt_of(local: _Local, tokens: int, seed: int) -> str:
    """A user message of about `tokens` tokens, its words its own (no two chats share a prefix)."""
    words = "the a server stream token reply model cache turn user question answer long short river "
    words += "mountain city night morning story engine window light green blue quiet loud fast slow"
    vocabulary = words.split()
    text = " ".join(vocabulary[(seed * 7 + i * 13 + i // 5) % len(vocabulary)] for i in range(tokens))
    ids = local.tokenizer(f"{seed}: {text}", add_special_tokens=False)["input_ids"][:tokens]
    decoded: str = local.tokenizer.decode(ids)
    return decoded


def bench_growth(path: Path, counts: list[int], lengths: list[int], new_tokens: int) -> dict[str, Any]:
    """Per-chat decode tokens/s and first byte of `count` chats of `length`-token prompts, beside
    a static batch of the same prompts in `model.generate`."""
    local = _Local(path)
    local.generate(local.ids(["warm up"]), 4)
    results: dict[str, Any] = {}
    seed = 0
    settings = {"concurrency": max(counts), "queue": max(counts), "max_new_tokens": new_tokens, "context_len": 8192}
    with running_server(path, **settings) as (url, _):
        anyio.run(_chats, url, ["warm up"], 4)
        for length in lengths:
            for count in counts:
                seed += count
                texts = [_prompt_of(local, length, seed + i) for i in range(count)]
                ids = local.ids(texts)
                _, first = local.generate(ids, 1, until_end=False)
                _, whole = local.generate(ids, new_tokens, until_end=False)
                static_decode = (new_tokens - 1) / max(1e-9, whole - first)
                replies = anyio.run(_chats, url, texts, new_tokens)
                # (each reply's tokens counted by tokenizing its text: a real model's text re-tokenizes
                # as it was written, and a reply may end before the limit)
                decode = [
                    (len(local.tokenizer(reply.text, add_special_tokens=False)["input_ids"]) - 1)
                    / max(1e-9, reply.chunk_times[-1] - reply.chunk_times[0])
                    for reply in replies
                ]
                results[f"{count}x{length}"] = {
                    "prompt_tokens": int(ids.shape[1]),
                    "decode_tokens_per_second_per_chat": statistics.median(decode),
                    "static_decode_tokens_per_second_per_chat": static_decode,
                    "decode_ratio": statistics.median(decode) / static_decode,
                    "first_byte_ms": statistics.median(r.first_byte for r in replies) * 1e3,
                    "static_first_token_ms": first * 1e3,
                }
    return results
