"""What every benchmark needs: the server in its own process, a bare-socket client for the wire, RSS, percentiles."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def running_server(model: Path, **settings: int) -> Iterator[tuple[str, int]]:
    """`bench.app` under uvicorn in a child process; yields its base URL and pid once it is ready."""
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
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RawChat:
    """One request over a bare socket: the benchmark sees every byte, head and chunk framing included."""

    def __init__(self, url: str, path: str, body: dict[str, Any]) -> None:
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        self._sock = socket.create_connection((host, int(port)), timeout=300)
        self._sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        self.received = b""

    def to_the_end(self) -> None:
        """Read the whole chunked reply."""
        while not self.received.endswith(b"0\r\n\r\n"):
            chunk = self._sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            self.received += chunk
        self._sock.close()

    def body(self) -> bytes:
        """The de-chunked body received so far."""
        rest = self.received.split(b"\r\n\r\n", 1)[1]
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
        return body
