"""An aiomqtt client that reports each PUBACK's reason code.

aiomqtt 2.5 discards the reason code, but Mosquitto answers a publish its ACL denies (or one that
is too large) with a PUBACK too, reason 0x87 under MQTT 5: a code >= 0x80 is a rejection, and a
batch may be deleted only after a success.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from edge_agent.config.schema import MqttConfig


class AckingClient(aiomqtt.Client):
    """`publish_acked` returns the PUBACK reason code; pending ones fail on disconnect."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[int]] = {}
        self.lost = asyncio.Event()
        """Set when the connection drops, so an idle publisher notices at once."""

    async def publish_acked(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the broker's reason code (0 = success)."""
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish batch")
        # PUBACKs are read only in loop callbacks, so none can arrive before this line.
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = future
        try:
            return await future
        finally:
            self._acks.pop(info.mid, None)

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
        if future is not None and not future.done():
            future.set_result(int(getattr(reason_code, "value", reason_code)))
        super()._on_publish(client, userdata, mid, reason_code, properties)

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
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        for future in self._acks.values():
            if not future.done():
                future.set_exception(aiomqtt.MqttError(f"Disconnected: {reason_code}"))
        self._acks.clear()
        self.lost.set()


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
