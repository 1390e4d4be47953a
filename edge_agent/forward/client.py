"""An aiomqtt client that reports each PUBACK's reason code, the broker's limits and why it left.

aiomqtt 2.5 discards the reason code, but Mosquitto answers a publish its ACL denies with a PUBACK
too, reason 0x87 under MQTT 5: a code >= 0x80 is a rejection, and a batch may be deleted only
after a success. aiomqtt also drops the CONNACK properties (the limits the broker advertises) and
the reason code of the broker's DISCONNECT, which is the only place an MQTT 5 broker says why it
closed the connection (0x95 Packet too large, say); this client keeps both. It also keeps the
time each publish has waited for its PUBACK (`answers`, forward/stall.py), and can drop a
connection the broker has gone silent on (`abort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config.schema import MqttConfig
from edge_agent.forward.stall import AnswerClock

PACKET_TOO_LARGE = 0x95


@dataclass(frozen=True)
class BrokerLimits:
    """What the broker advertised in its CONNACK (MQTT 5 §3.2.2.3); None where it said nothing.

    Under MQTT 3.1.1 a broker advertises nothing, though it may still enforce limits.
    """

    max_packet_size: int | None = None
    """Largest packet, in bytes, header included, that the broker accepts (Maximum Packet Size)."""
    receive_maximum: int | None = None
    """QoS 1 and 2 publishes the broker lets a client have unacknowledged (Receive Maximum)."""
    topic_alias_maximum: int | None = None
    """Topic aliases the broker accepts; the agent sends none, so any value is honoured."""
    retain_available: bool | None = None
    """False when the broker said it keeps no retained messages (Retain Available 0): then a
    retained PUBLISH is a protocol error it disconnects for (MQTT 5 §3.3.1.3, 0x9A), and point
    catalogues go out not retained. None: not said, which means available."""

    @property
    def retains(self) -> bool:
        """Whether a retained PUBLISH is allowed (MQTT 5 §3.2.2.3.5: unsaid means yes)."""
        return self.retain_available is not False

    def describe(self) -> str:
        """`max_packet_size=550 receive_maximum=2`, or `none advertised`."""
        said = [f"{name}={value}" for name, value in vars(self).items() if value is not None]
        return " ".join(said) or "none advertised"


class AckingClient(aiomqtt.Client):
    """`publish_acked` returns the PUBACK reason code; pending ones fail on disconnect."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[int]] = {}
        self.lost = asyncio.Event()
        """Set when the connection drops, so an idle publisher notices at once."""
        self.limits = BrokerLimits()
        """The broker's limits from the last CONNACK."""
        self.disconnect_cause: str | None = None
        """Why the connection ended, in words (the broker's reason when it gave one)."""
        self.disconnect_code: int | None = None
        """The reason code of the broker's DISCONNECT (MQTT 5 only); None if it sent none."""
        self.answers = AnswerClock(time.monotonic())
        """Batches awaiting their PUBACK, and when the broker last answered one."""

    def abort(self, cause: str) -> None:
        """Drop the connection now, without waiting on the broker (it is not answering): the
        socket is shut down both ways, paho reads the end at once and reports the loss
        (`lost`), with `cause` as `disconnect_cause`."""
        if self.disconnect_cause is None:
            self.disconnect_cause = cause
        shutdown = getattr(self._client.socket(), "shutdown", None)  # a socket, or SSL's
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)

    async def publish_acked(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 (retained if asked) and return the broker's reason code (0 =
        success)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish batch")
        # PUBACKs are read only in loop callbacks, so none can arrive before this line.
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = future
        self.answers.sent(info.mid, time.monotonic())
        try:
            return await future
        finally:
            self._acks.pop(info.mid, None)
            self.answers.forget(info.mid)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any = None,
    ) -> None:
        self.limits = BrokerLimits(
            max_packet_size=getattr(properties, "MaximumPacketSize", None),
            receive_maximum=getattr(properties, "ReceiveMaximum", None),
            topic_alias_maximum=getattr(properties, "TopicAliasMaximum", None),
            retain_available=_flag(getattr(properties, "RetainAvailable", None)),
        )
        self.answers = AnswerClock(time.monotonic())
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: Any,
        properties: Any,
    ) -> None:
        # Only ids that publish_acked issued: a stale code (say, of the status message) must
        # never answer a later batch that reuses the id after it wraps at 65535.
        future = self._acks.pop(mid, None)
        if future is not None:
            self.answers.answered(mid, time.monotonic())
            if not future.done():
                future.set_result(int(getattr(reason_code, "value", reason_code)))
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """Watch the new socket for reading, but only if it is still paho's when the loop gets
        to it.

        paho opens the socket on aiomqtt's connect thread, so aiomqtt registers it with
        `call_soon_threadsafe` and the file descriptor number taken now; a socket paho closes
        before the loop runs that call (a connect that fails after opening it) left an
        "exception in callback" traceback, or a reader on whatever reused the number.
        """

        def read() -> None:
            try:
                while True:
                    client.loop_read()
                    # loop_read does not always consume what an SSL socket already decoded.
                    pending = getattr(client.socket(), "pending", None)
                    if pending is None or pending() == 0:
                        break
            except Exception as error:  # noqa: BLE001 - any error here means the link broke
                self._lose(error)

        self._on_loop(lambda: self._watch(client, sock, self._loop.add_reader, read))
        self._on_loop(self._start_misc_loop)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """Watch the socket for writing while paho has bytes queued, if it is still open.

        aiomqtt deferred this to the loop's next turn with the descriptor number taken now; when
        the broker's close was read in the same turn (paho closes the socket and unregisters
        the writer first), the deferred call then watched a closed descriptor: the "exception in
        callback" traceback a broker restart left in the fault suite's log, or a writer on
        whatever reused the number (a busy loop). On the loop's own thread it now registers at
        once; from another thread, only if the socket is still paho's when the loop runs it.
        """

        def write() -> None:
            try:
                client.loop_write()
            except Exception as error:  # noqa: BLE001 - any error here means the link broke
                self._lose(error)

        self._on_loop(lambda: self._watch(client, sock, self._loop.add_writer, write))

    def _on_loop(self, call: Callable[[], None]) -> None:
        """Run `call` now if this is the loop's thread, else on the loop's next turn."""
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            call()
        else:
            self._loop.call_soon_threadsafe(call)

    @staticmethod
    def _watch(
        client: paho.Client,
        sock: Any,
        add: Callable[[int, Callable[[], None]], None],
        callback: Callable[[], None],
    ) -> None:
        """Register `callback` for `sock` unless paho has closed or replaced it since."""
        fileno: int = sock.fileno()
        if fileno >= 0 and client.socket() is sock:
            add(fileno, callback)

    def _start_misc_loop(self) -> None:
        self._misc_task = self._loop.create_task(self._misc_loop())

    def _lose(self, error: Exception) -> None:
        if not self._disconnected.done():
            self._disconnected.set_exception(error)

    async def __aexit__(self, *exc_info: Any) -> None:
        """Mark a lost connection's error as seen: the pump already raised it.

        aiomqtt returns early when already disconnected, leaving its future's exception
        unretrieved, which asyncio then logs as an error after every outage.
        """
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()
        await super().__aexit__(*exc_info)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any = None,
    ) -> None:
        if self.disconnect_cause is None:
            self.disconnect_cause = disconnect_cause(flags, reason_code, properties)
            if getattr(flags, "is_disconnect_packet_from_server", False):
                self.disconnect_code = int(getattr(reason_code, "value", reason_code))
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        for future in self._acks.values():
            if not future.done():
                future.set_exception(aiomqtt.MqttError(f"Disconnected: {self.disconnect_cause}"))
        self._acks.clear()
        self.lost.set()


def _flag(value: object) -> bool | None:
    """A CONNACK byte property (0 or 1) as a bool; None when absent."""
    return None if value is None else bool(value)


PAHO_CAUSES = {
    0x00: "disconnected",
    0x82: "the broker sent a packet paho cannot decode (protocol error); paho closed the"
    " connection",
    0x8D: "no answer from the broker within the keep-alive",
}
"""What paho means by the codes it reports for a connection it saw end without a DISCONNECT."""


def disconnect_cause(flags: Any, reason_code: Any, properties: Any) -> str:
    """The broker's DISCONNECT reason (MQTT 5 §3.14.2.1) and reason string, or what paho saw.

    paho reports a closed socket as "Unspecified error" (0x80) too; only
    `is_disconnect_packet_from_server` tells the broker's word from paho's guess.
    """
    code = int(getattr(reason_code, "value", reason_code) or 0)
    if getattr(flags, "is_disconnect_packet_from_server", False):
        said = f"broker sent DISCONNECT reason=0x{code:02x} {reason_code}"
        reason_string = getattr(properties, "ReasonString", None)
        return f"{said} ({reason_string})" if reason_string else said
    return PAHO_CAUSES.get(
        code, "connection closed (by the broker or the network) without a DISCONNECT reason"
    )


def accept_puback_packet_too_large() -> None:
    """Let paho decode a PUBACK with reason 0x95 Packet too large instead of dropping the link.

    MQTT 5 §3.4.2.1 does not list 0x95 for PUBACK, but Mosquitto 2.0 answers a message over its
    `message_size_limit` with exactly that. paho then rejects the PUBACK as malformed and closes
    the connection, so the batch would be retried forever; decoded, it is evicted at once as too
    large. paho copies this table per reason code shallowly, so adding the packet type to the
    shared list is enough, and it is idempotent.
    """
    packets = ReasonCode.names[PACKET_TOO_LARGE]["Packet too large"]
    if PacketTypes.PUBACK not in packets:
        packets.append(PacketTypes.PUBACK)


accept_puback_packet_too_large()


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """Verification on, hostname checked: the system CAs, or the configured CA file."""
    if not config.uses_tls:
        return None
    tls = config.tls
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls is not None and tls.ca_file is not None else None
    )
    if tls is not None and tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def protocol_version(config: MqttConfig) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if config.protocol == "5" else aiomqtt.ProtocolVersion.V311


def publish_packet_size(topic: str, payload: int, *, v5: bool) -> int:
    """Bytes of a QoS 1 PUBLISH of `payload` bytes to `topic`, without properties.

    MQTT 5 §3.3 (3.1.1 §3.3 without the property length): fixed header (1 byte and the remaining
    length, 1-4 bytes), topic (2-byte length and UTF-8), packet id (2), property length (1, MQTT
    5 only), payload. This is what Maximum Packet Size bounds (§3.2.2.3.6).
    """
    remaining = 2 + len(topic.encode()) + 2 + (1 if v5 else 0) + payload
    length_bytes = 1 + (remaining >= 128) + (remaining >= 16_384) + (remaining >= 2_097_152)
    return 1 + length_bytes + remaining
