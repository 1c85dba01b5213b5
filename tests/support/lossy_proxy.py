"""A TCP proxy in front of the real aggregator that loses the responses of the first N
attendance POSTs: the request reaches the aggregator (and is stored) but the device never sees
the answer, exactly like a network cut after the server committed."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.harness import free_port


class LossyProxy:
    def __init__(self, target_port: int, drop_attendance_responses: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._drops_left = drop_attendance_responses
        self.dropped = 0
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(16)
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self._target))
        drop = threading.Event()

        def down() -> None:  # aggregator -> device
            while True:
                try:
                    data = upstream.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                if drop.is_set():
                    # The aggregator answered; the device never hears it.
                    with self._lock:
                        self.dropped += 1
                    break
                try:
                    client.sendall(data)
                except OSError:
                    break
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

        threading.Thread(target=down, daemon=True).start()
        while True:  # device -> aggregator
            try:
                data = client.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                return
            if data.startswith(b"POST /api/v1/attendance"):
                with self._lock:
                    if self._drops_left > 0:
                        self._drops_left -= 1
                        drop.set()
            try:
                upstream.sendall(data)
            except OSError:
                return
