"""A systemd notification socket for a real agent process: what `Type=notify` units receive.

The agent sends datagrams (READY=1, STATUS=..., RELOADING=1) to $NOTIFY_SOCKET
(edge_agent/systemd.py); here an abstract AF_UNIX datagram socket takes them, and a test waits
on the next one that matches, as systemd does: an event, never a fixed sleep.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable


class NotifySocket:
    """Bound on creation; `env` goes into the agent's environment; close it when done."""

    def __init__(self) -> None:
        name = f"edge-agent-test-{os.getpid()}-{id(self)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)
        self.env = {"NOTIFY_SOCKET": "@" + name}
        self.received: list[str] = []
        """Every notification so far, in order."""

    def wait_for(self, matches: Callable[[str], bool], timeout: float, what: str) -> str:
        """The next notification for which `matches` is true; TimeoutError naming `what`."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                message = self.sock.recv(65536).decode()
            except TimeoutError:
                break
            self.received.append(message)
            if matches(message):
                return message
        raise TimeoutError(f"no notification {what} within {timeout:g}s: {self.received}")

    def close(self) -> None:
        self.sock.close()
