"""The floor under any fan-out: one ``send()`` of a 200-byte SSE frame to each of 2,000 TCP
connections whose readers (another process) wait in epoll, from plain Python sockets. On loopback
the sender's CPU includes the kernel's delivery to the reader and its wake-up; a gateway that writes
each frame to each subscriber cannot cost less per frame than this.

``python -m bench.send_floor PORT`` is the reading side; ``measure()`` the sending side."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time

CONNECTIONS = 2000
ROUNDS = 40
FRAME = b"c8\r\n" + b"x" * 200 + b"\r\n"


def measure() -> float:
    """The sender's CPU per frame (µs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    readers = subprocess.Popen([sys.executable, "-m", "bench.send_floor", str(port)])
    try:
        sockets = [listener.accept()[0] for _ in range(CONNECTIONS)]
        time.sleep(0.5)
        before = os.times()
        for _ in range(ROUNDS):
            for connection in sockets:
                connection.send(FRAME)
            time.sleep(0.05)  # the readers drain and wait again, as subscribers between tokens do
        after = os.times()
        readers.wait(timeout=30)
        for connection in sockets:
            connection.close()
        used = (after.user + after.system) - (before.user + before.system)
        return used * 1e6 / (ROUNDS * CONNECTIONS)
    finally:
        if readers.poll() is None:
            readers.kill()
        listener.close()


def _read(port: int) -> None:
    selector = selectors.DefaultSelector()
    for _ in range(CONNECTIONS):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.setblocking(False)
        selector.register(connection, selectors.EVENT_READ)
    expected, got = CONNECTIONS * ROUNDS * len(FRAME), 0
    while got < expected:
        for key, _ in selector.select(timeout=10):
            got += len(key.fileobj.recv(65536))  # type: ignore[union-attr]


if __name__ == "__main__":
    _read(int(sys.argv[1]))
