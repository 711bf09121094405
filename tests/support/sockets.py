"""Sockets in the states an upstream can be in, for tests that need one without a server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from typing import Iterator


def free_port() -> int:
    """A port nothing listens on (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def blackholed_port() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a
    connect to it hangs until the connector's own timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def nginx_binary() -> str:
    """Debian's nginx (CI installs it): its path, or an error that says how to get it."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
    return binary


async def wait_listening(port: int, timeout: float = 60.0) -> None:
    """Poll until something accepts connections on 127.0.0.1:port, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            assert loop.time() < deadline, f"nothing listening on {port}"
            await asyncio.sleep(0.05)
