"""Benchmarks: `python -m bench` (full) or `python -m bench --quick` (a seconds-long smoke run).

Builds random-weight models offline, starts the server for real (uvicorn in its own process on
127.0.0.1) and prints each figure beside the baseline it is divided by, measured in the same run:
these machines are shared and noisy, so only ratios compare across runs. A JSON file keeps the
raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from chatstream_asgi.demo_model import build_demo_model

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def running_server(model: Path, **settings: int) -> Iterator[str]:
    """`bench.app` under uvicorn in a child process; yields its base URL once it is ready."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "BENCH_MODEL": str(model), **{f"BENCH_{k.upper()}": str(v) for k, v in settings.items()}}
    command = [sys.executable, "-m", "uvicorn", "bench.app:app", "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [*command, "--log-level", "warning", "--no-access-log"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError("the benchmark server did not start:\n" + log.read().decode()[-3000:])
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _load(url: str) -> dict[str, int]:
    load: dict[str, int] = httpx.get(f"{url}/ready").json()["load"]
    return load


def _wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("benchmark condition never came true")
        time.sleep(0.005)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _health_latencies(url: str, count: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url) as client:
        client.get("/health")  # open the connection outside the measurement
        for _ in range(count):
            start = time.perf_counter()
            client.get("/health")
            latencies.append(time.perf_counter() - start)
    return latencies


class _Chat(threading.Thread):
    """One streaming chat on its own connection, read to the end (or until `stop` is set)."""

    def __init__(self, url: str, max_new_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_new_tokens = url, max_new_tokens
        self.stop = threading.Event()
        self.first_byte_at: float | None = None
        self.bytes = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as client:
            body = {"user_input": "Tell me a long story.", "max_new_tokens": self.max_new_tokens}
            with client.stream("POST", "/chat_stream", json=body) as response:
                for chunk in response.iter_raw():
                    if self.first_byte_at is None:
                        self.first_byte_at = time.perf_counter()
                    self.bytes += len(chunk)
                    if self.stop.is_set():
                        break


def bench_event_loop(model: Path, quick: bool) -> dict[str, Any]:
    """p50/p99 of GET /health with every slot generating ÷ the same with the server idle."""
    samples = 50 if quick else 400
    slots = 2
    with running_server(model, concurrency=slots, queue=2, max_new_tokens=3000) as url:
        idle = _health_latencies(url, samples)
        chats = [_Chat(url, 3000) for _ in range(slots + 1)]  # every slot busy, one more queued
        for chat in chats:
            chat.start()
        _wait_for(lambda: _load(url)["processing"] == slots and _load(url)["waiting"] == 1)
        loaded = _health_latencies(url, samples)
        still_busy = _load(url)["processing"] == slots
        for chat in chats:
            chat.stop.set()
        for chat in chats:
            chat.join(60)
    if not still_busy:
        raise RuntimeError("generations ended during the loaded measurement: raise max_new_tokens")
    return {
        "samples": samples,
        "idle_p50_ms": statistics.median(idle) * 1e3,
        "idle_p99_ms": _percentile(idle, 0.99) * 1e3,
        "loaded_p50_ms": statistics.median(loaded) * 1e3,
        "loaded_p99_ms": _percentile(loaded, 0.99) * 1e3,
        "p50_ratio": statistics.median(loaded) / statistics.median(idle),
        "p99_ratio": _percentile(loaded, 0.99) / _percentile(idle, 0.99),
    }


class _RawChat:
    """A chat over a bare socket: the benchmark decides to the microsecond when the client leaves."""

    def __init__(self, url: str, max_new_tokens: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"user_input": "Tell me a long story.", "max_new_tokens": max_new_tokens}).encode()
        self.started_at = time.perf_counter()
        self._sock = socket.create_connection((host, int(port)), timeout=120)
        self._sock.sendall(
            f"POST /chat_stream HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        self._received = b""

    def first_byte(self) -> float:
        """Wait for the first chunk of reply text; return when it arrived."""
        while b"\r\n\r\n" not in self._received or not self._received.split(b"\r\n\r\n", 1)[1]:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            self._received += chunk
        return time.perf_counter()

    def leave(self) -> float:
        """Close the connection mid-reply; return when."""
        self._sock.close()
        return time.perf_counter()


def bench_disconnect(model: Path, quick: bool) -> dict[str, Any]:
    """Decode steps after a client leaves; how soon a waiting request then streams."""
    trials = 3 if quick else 15
    with running_server(model, concurrency=1, queue=2, max_new_tokens=3000) as url:
        # Baseline: time to first reply byte of a request that finds the server idle.
        idle_first_byte = []
        for _ in range(trials):
            chat = _RawChat(url, 3000)
            idle_first_byte.append(chat.first_byte() - chat.started_at)
            chat.leave()
            _wait_for(lambda: _load(url)["processing"] == 0)
        # Hand-off: a queued request gets the slot once the running one's client leaves.
        handoffs = []
        for _ in range(trials):
            running = _RawChat(url, 3000)
            running.first_byte()
            waiting = _RawChat(url, 3000)
            _wait_for(lambda: _load(url)["waiting"] == 1)
            left_at = running.leave()
            handoffs.append(waiting.first_byte() - left_at)
            waiting.leave()
            _wait_for(lambda: _load(url)["processing"] == 0)
        finished = httpx.get(f"{url}/bench/finished").json()
    left = [f for f in finished if f["outcome"] == "client_disconnected_while_streaming"]
    steps = [f["steps_after_cancel"] for f in left]
    return {
        "disconnects": len(left),
        "steps_after_cancel_max": max(steps),
        "steps_after_cancel_mean": statistics.mean(steps),
        "idle_first_byte_ms": statistics.median(idle_first_byte) * 1e3,
        "handoff_first_byte_ms": statistics.median(handoffs) * 1e3,
        "handoff_ratio": statistics.median(handoffs) / statistics.median(idle_first_byte),
    }


def _table(results: dict[str, Any]) -> str:
    loop, gone = results["event_loop"], results["disconnect"]
    rows = [
        (
            "event loop: /health p50 with all slots generating",
            f"{loop['loaded_p50_ms']:.2f} ms",
            f"idle {loop['idle_p50_ms']:.2f} ms",
            f"{loop['p50_ratio']:.2f}x",
        ),
        (
            "event loop: /health p99 with all slots generating",
            f"{loop['loaded_p99_ms']:.2f} ms",
            f"idle {loop['idle_p99_ms']:.2f} ms",
            f"{loop['p99_ratio']:.2f}x",
        ),
        (
            "disconnect: decode steps after the client left (max)",
            str(gone["steps_after_cancel_max"]),
            "the step in flight: 1",
            f"{gone['steps_after_cancel_max'] / 1:.2f}x",
        ),
        (
            "disconnect: queued request's first byte after the client left",
            f"{gone['handoff_first_byte_ms']:.1f} ms",
            f"idle first byte {gone['idle_first_byte_ms']:.1f} ms",
            f"{gone['handoff_ratio']:.2f}x",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    header = ("figure", "measured", "baseline (same run)", "ratio")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (CI)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        # ~21M parameters: a decode step that costs what a small real model's does on a CPU.
        model = build_demo_model(Path(folder) / "model", hidden_size=512, num_hidden_layers=8, seed=1)
        results: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
            f"{platform.python_version()}",
            "quick": args.quick,
            "event_loop": bench_event_loop(model, args.quick),
            "disconnect": bench_disconnect(model, args.quick),
        }
    print(_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nraw figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
