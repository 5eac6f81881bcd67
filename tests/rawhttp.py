"""A raw HTTP/1.1 client for requests a real client library refuses to send (non-ASCII header
bytes, lying lengths, bodies that trickle or stop), and a parser for whatever comes back."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any

HANG_GUARD = 30.0


@dataclass
class RawResponse:
    status_code: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name.lower()), None)

    def headers_named(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def connect(url: str, timeout: float = HANG_GUARD) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def request_head(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]] | None = None) -> bytes:
    """The head of a request that closes the connection after the reply, as latin-1 bytes."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(sock: socket.socket) -> RawResponse:
    """Read until the server closes, and parse the status, headers and (de-chunked) body."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # a server that closes with our unread bytes pending resets
        if not data:
            raise
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip().lower(), value.strip()))
    response = RawResponse(status, headers)
    if response.header("transfer-encoding") == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        response.body = body
    else:
        response.body = rest
    return response


def exchange(url: str, head: bytes, body: bytes = b"", timeout: float = HANG_GUARD) -> RawResponse:
    """Send `head` + `body` on a fresh connection and read the whole reply."""
    with connect(url, timeout) as sock:
        sock.sendall(head + body)
        return read_response(sock)
