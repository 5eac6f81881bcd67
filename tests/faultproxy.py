"""A TCP proxy in front of a real server that injects network faults: requests that arrive late
or never, answers held back. What a stalled link or a lost packet does to a client, on demand,
with the real server behind it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

HANG_GUARD = 30.0


class FaultProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, a thread per direction of each
    connection. Faults apply to what passes from the moment they are set."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        #: Seconds each chunk of a request waits before it is forwarded (a slow link).
        self.request_delay = 0.0
        #: Requests are read and thrown away (a link that loses them).
        self.drop_requests = False
        #: Chunks of answers the server sent (counted whether or not the client is still there).
        self.answers = 0
        self._answers_flow = threading.Condition()
        self._held = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False

    def url(self, db: int = 0) -> str:
        """The proxy as a Redis URL."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def hold_answers(self) -> None:
        """Keep the server's answers back: it runs the commands, its replies wait here."""
        with self._answers_flow:
            self._held = True

    def release_answers(self) -> None:
        """Let the held answers (and every later one) through."""
        with self._answers_flow:
            self._held = False
            self._answers_flow.notify_all()

    def __enter__(self) -> FaultProxy:
        self._start(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self.release_answers()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it; close alone would not
            except OSError:  # already shut down by its other end
                pass
            sock.close()
        for thread in self._threads:
            thread.join(HANG_GUARD)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed: the proxy is stopping
                return
            server = socket.create_connection(("127.0.0.1", self._target_port))
            self._sockets += [client, server]
            self._start(self._pump_requests, client, server)
            self._start(self._pump_answers, server, client)

    def _pump_requests(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while chunk := client.recv(65536):
                if self.drop_requests:
                    continue
                if self.request_delay:
                    time.sleep(self.request_delay)  # the injected fault: this request is late
                server.sendall(chunk)
            server.shutdown(socket.SHUT_WR)
        except OSError:  # either side closed: this connection is over
            pass

    def _pump_answers(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := server.recv(65536):
                with self._answers_flow:
                    self.answers += 1
                    self._answers_flow.notify_all()
                    self._answers_flow.wait_for(lambda: not self._held, HANG_GUARD)
                client.sendall(chunk)
            client.shutdown(socket.SHUT_WR)
        except OSError:  # either side closed: this connection is over
            pass

    def wait_for_answers(self, count: int) -> bool:
        """Wait until the server has sent `count` chunks of answers in all (a hang guard)."""
        with self._answers_flow:
            return self._answers_flow.wait_for(lambda: self.answers >= count, HANG_GUARD)
