"""A TCP proxy of the tests' own that breaks the network path on cue, the way real networks do.

This is a fake in the sense of the test standards: no real part can be told to fail like this
at a chosen moment. It sits between a client (the agent) and a server and forwards bytes both
ways until told otherwise:

- `reset()`: the client side of every open connection gets a TCP RST (SO_LINGER 0), as from a
  firewall that lost its state table or a router that rebooted. By default the server side is
  left open and hears nothing more (`server="keep"`): the server keeps a half-open connection and
  whatever session it carried, exactly as when the path is cut between the two. With
  `server="reset"` the server side is reset too. New connections work at once.
- `silence()`: nothing passes in either direction and nothing is closed: a half-open path (a
  pulled cable, a stalled VPN, a dead switch). Bytes are held, not dropped, because TCP would
  retransmit them; connections opened meanwhile are accepted and held the same way (their
  handshake completes, nothing after it is answered).
- `slow(bandwidth=..., latency=...)`: a slow link (satellite, a congested cellular cell): each
  direction of each connection carries at most `bandwidth` bytes/s, and every byte arrives
  `latency` s after it was sent, on top of the time the bandwidth takes. At most QUEUE_BYTES are
  held in the path per direction (a router's queue); past that the sender's writes wait, as TCP
  makes them. Our own code in asyncio: there is no toxiproxy or `tc netem` here.
- `restore()`: the path works again at full speed; what was held is delivered, closes included.

Use it as an async context manager: `async with FaultProxy(port) as proxy: ... proxy.port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

_CHUNK = 65536
_SLICE = 4096
"""Chunk size on a slow path: the bandwidth is kept to within a slice."""
QUEUE_BYTES = 128 * 1024
"""Bytes a slow path holds per direction before the sender has to wait."""


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client-side and server-side streams and their pumps."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    cut: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`; see the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        """Connections accepted so far, from the client side."""
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._links: set[_Link] = set()
        self._held: set[_Link] = set()
        """Links whose client side was reset with `server="keep"`: the server side stays open."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._bandwidth: int | None = None
        self._latency = 0.0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._stopping = True
        self._open.set()
        for link in self._links | self._held:
            link.cut = True
            for writer in (link.client, link.server):
                writer.transport.abort()
            for pump in link.pumps:
                pump.cancel()
        # The connection handlers end on their own (asyncio's server does not expect them to be
        # cancelled); their pumps were cancelled above.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._links.clear()
        self._held.clear()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connections(self) -> int:
        """Connections currently forwarded (not counting server sides kept after a reset)."""
        return len(self._links)

    def reset(self, *, server: Literal["keep", "reset"] = "keep") -> None:
        """RST the client side of every open connection; the server side is kept or reset."""
        for link in list(self._links):
            link.cut = True
            for pump in link.pumps:
                pump.cancel()
            _rst(link.client)
            if server == "reset":
                _rst(link.server)
            else:
                self._held.add(link)
            self._links.discard(link)

    def silence(self) -> None:
        """Hold every byte in both directions, on open and new connections, closing nothing."""
        self._open.clear()

    def slow(self, *, bandwidth: int | None = None, latency: float = 0.0) -> None:
        """From now on, every direction of every connection: at most `bandwidth` bytes/s (None:
        no limit) and `latency` seconds one way (see the module docstring)."""
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, not {bandwidth}")
        self._bandwidth, self._latency = bandwidth, max(0.0, latency)

    def restore(self) -> None:
        """Let traffic through again, at full speed, delivering what was held."""
        self._bandwidth, self._latency = None, 0.0
        self._open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._open.wait()
            if self._stopping:
                writer.transport.abort()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                _rst(writer)
                return
            link = _Link(writer, up_writer)
            self._links.add(link)
            link.pumps = [
                asyncio.create_task(self._pump(reader, up_writer, link), name="proxy-up"),
                asyncio.create_task(self._pump(up_reader, writer, link), name="proxy-down"),
            ]
            await asyncio.gather(*link.pumps, return_exceptions=True)
            if not link.cut:  # both directions closed normally (or failed): the link is over
                self._links.discard(link)
                for side in (link.client, link.server):
                    side.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Read from `source` into the path; `_deliver` writes what is due to `sink`."""
        path: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_BYTES // _SLICE)
        deliver = asyncio.create_task(self._deliver(path, sink, link), name="proxy-deliver")
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await source.read(_SLICE if self._bandwidth or self._latency else _CHUNK)
                await self._open.wait()  # silent: hold the bytes, as TCP would keep resending
                if link.cut:
                    return
                await path.put((loop.time() + self._latency, data))
                if not data:
                    break
            await deliver
        except (ConnectionError, OSError):
            self._failed(link)
        finally:
            deliver.cancel()

    async def _deliver(
        self, path: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Write each chunk once its latency has passed, at most at the bandwidth."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await path.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._open.wait()
                if link.cut:
                    return
                if not data:
                    with contextlib.suppress(OSError):
                        sink.write_eof()
                    return
                sink.write(data)
                await sink.drain()
                if self._bandwidth:
                    await asyncio.sleep(len(data) / self._bandwidth)
        except (ConnectionError, OSError):
            self._failed(link)

    def _failed(self, link: _Link) -> None:
        if not link.cut:  # one side failed: so does the other, as across a real path
            for writer in (link.client, link.server):
                writer.transport.abort()
