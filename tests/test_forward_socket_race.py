"""A socket paho closes before the event loop registers it: a connection error, never a traceback.

Found by the fault suite (a broker restarted under a full disk): the agent's log held asyncio's
"Exception in callback ... _add_writer" traceback. aiomqtt deferred watching paho's socket to the
loop's next turn with the descriptor number taken at once; when the socket was closed in between,
the deferred call watched a closed (or, worse, reused) descriptor. Both cases below run a real
Mosquitto and the real paho client; the only injected fault is the broker's end of the stream
(`shutdown`), so that paho reads it exactly when the race needs it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.client import AckingClient

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(directory=tmp_path) as running:
        yield running


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the running loop would have logged as "Exception in callback" (with a traceback)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


def watched(fileno: int) -> bool:
    """Whether the running loop's selector still watches `fileno` (for reading or writing)."""
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    return fileno in selector.get_map()


async def test_a_publish_in_the_turn_the_broker_closes_is_a_lost_connection(
    broker: Mosquitto, loop_errors: list[dict[str, Any]]
) -> None:
    """The fault suite's case: a batch is published and, in the same turn of the loop, paho
    reads the broker's end of the connection and closes the socket."""
    async with AckingClient(hostname="127.0.0.1", port=broker.port) as client:
        paho = client._client
        fileno = paho.socket().fileno()  # type: ignore[union-attr]
        paho.publish("t/batch", b"x" * 100_000, qos=1)  # paho asks to be told when writable
        paho.socket().shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        paho.loop_read()  # reads the end, closes the socket
        await asyncio.wait_for(client.lost.wait(), 5)
        await barrier()
        assert loop_errors == []
        assert not watched(fileno)


async def test_a_socket_closed_on_the_connect_thread_is_never_watched(
    broker: Mosquitto, loop_errors: list[dict[str, Any]]
) -> None:
    """Another instance of the kind: paho opens the socket on a thread of its own (aiomqtt's
    connect), and closes it there before the loop has registered it for reading."""
    client = AckingClient(hostname="127.0.0.1", port=broker.port)
    client._loop = asyncio.get_running_loop()
    paho = client._client
    filenos: list[int] = []

    def open_then_lose() -> None:
        paho.connect("127.0.0.1", broker.port)  # opens the socket: on_socket_open, this thread
        sock = paho.socket()
        assert sock is not None
        filenos.append(sock.fileno())
        sock.shutdown(socket.SHUT_RDWR)
        paho.loop_read()  # reads the end and closes the socket, still on this thread

    await asyncio.get_running_loop().run_in_executor(None, open_then_lose)
    await barrier()
    assert paho.socket() is None, "paho closed the socket"
    assert loop_errors == []
    assert not watched(filenos[0])


async def barrier() -> None:
    """Return once every callback already queued on the loop (from any thread) has run."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon_threadsafe(done.set_result, None)
    await done
