"""The demo's local broker: Mosquitto from PATH when installed, else amqtt in this process.

Both are started, stopped (for the outage scene) and restarted on one fixed localhost port, so
the agent and the verifier reconnect to the same URL. amqtt speaks MQTT 3.1.1 only, so
`protocol` tells the demo which MQTT version its clients must use.

amqtt keeps sessions in memory: a restart forgets the verifier's persistent subscription, and a
batch the agent publishes before the verifier has resubscribed would be dropped, showing up as a
hole that no real broker with persistence (Mosquitto, as configured in `broker.py`) would cause.
The embedded broker therefore re-creates the subscriptions it was told to remember right after
it starts listening again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal, Protocol

from edge_agent.demo.broker import Mosquitto, free_port, mosquitto_path
from edge_agent.errors import EdgeAgentError
from edge_agent.logs import EMBEDDED_BROKER_LEVELS, set_levels

BrokerChoice = Literal["auto", "mosquitto", "embedded"]

INSTALL_HINT = (
    "the demo needs an MQTT broker: install Mosquitto (apt-get install mosquitto) "
    "or the embedded one (pip install 'edge-agent[demo]')"
)


class BrokerUnavailableError(EdgeAgentError, RuntimeError):
    """Neither Mosquitto nor amqtt can be used; the message says what to install."""


class LocalBroker(Protocol):
    """What the demo needs of a broker: a URL, an MQTT version, and start/stop at will."""

    name: str
    url: str
    protocol: Literal["5", "3.1.1"]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def remember_subscription(self, client_id: str, topic: str) -> None: ...


class MosquittoBroker:
    """Mosquitto as a child process; its persistence keeps sessions across an outage."""

    name = "mosquitto"
    protocol: Literal["5", "3.1.1"] = "5"

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._mosquitto = Mosquitto(directory=directory)
        self.url = self._mosquitto.url

    async def start(self) -> None:
        await asyncio.to_thread(self._mosquitto.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self._mosquitto.stop)

    def remember_subscription(self, client_id: str, topic: str) -> None:
        """Nothing to do: Mosquitto saves sessions to disk when it stops."""


class EmbeddedBroker:
    """amqtt on this event loop; a fresh `Broker` per start, since a stopped one keeps state."""

    name = "embedded (amqtt)"
    protocol: Literal["5", "3.1.1"] = "3.1.1"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._broker: Any = None
        self._subscriptions: list[tuple[str, str]] = []
        set_levels(EMBEDDED_BROKER_LEVELS)

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    async def start(self) -> None:
        from amqtt.broker import Broker, BrokerContext  # noqa: PLC0415 - optional dependency

        broker = Broker(self._config())
        await broker.start()
        context = BrokerContext(broker)
        for client_id, topic in self._subscriptions:
            await context.add_subscription(client_id, topic, 1)
        self._broker = broker

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()

    def remember_subscription(self, client_id: str, topic: str) -> None:
        self._subscriptions.append((client_id, topic))


def embedded_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def choose_broker(choice: BrokerChoice, directory: Path) -> LocalBroker:
    """Mosquitto when asked or installed, else amqtt; raise with an install hint if neither."""
    if choice == "mosquitto" or (choice == "auto" and mosquitto_path() is not None):
        if mosquitto_path() is None:
            raise BrokerUnavailableError("mosquitto is not installed (apt-get install mosquitto)")
        return MosquittoBroker(directory)
    if not embedded_available():
        raise BrokerUnavailableError(INSTALL_HINT)
    return EmbeddedBroker()
