"""The private (or undocumented) library attributes edge-agent relies on, pinned one by one.

Each is used where the public API cannot do the job (the comment at the use says why). An upgrade
that renames or changes one fails here first, with a message naming the attribute, the file that
relies on it and what would break, instead of as a hang or a silent loss in an integration test.
When one fails: read the library's changelog for that attribute, adapt the code that uses it,
then this test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState, UASocketProtocol
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.pdu import ExceptionResponse

from edge_agent.forward.client import AckingClient

pytestmark = pytest.mark.unit

FORWARD = "edge_agent/forward/client.py (AckingClient)"
OPCUA = "edge_agent/sources/opcua/source.py (_subscribe, _consume)"
SESSION = "edge_agent/sources/opcua/session.py (SessionTicket, take_over, LossWatch)"
LINK = "edge_agent/sources/modbus/link.py (ModbusLink)"
DECODE = "tests/test_modbus_decode.py (the independent check of the agent's decoder)"


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


# aiomqtt 2.5 / paho-mqtt 2: the PUBACK reason code, which aiomqtt discards.


async def test_aiomqtt_hands_paho_callbacks_to_methods_a_subclass_overrides() -> None:
    client = AckingClient(hostname="127.0.0.1")
    inner = getattr(client, "_client", None)
    assert isinstance(inner, paho.Client), (
        f"aiomqtt.Client._client is no longer the paho client: {FORWARD}.publish_acked "
        "publishes through it to learn the message id"
    )
    on_publish, on_disconnect = inner.on_publish, inner.on_disconnect
    assert getattr(on_publish, "__func__", None) is AckingClient._on_publish, (
        f"paho's on_publish is not aiomqtt.Client._on_publish any more ({on_publish!r}): "
        f"{FORWARD} would never see a PUBACK, so no batch would be deleted"
    )
    assert getattr(on_disconnect, "__func__", None) is AckingClient._on_disconnect, (
        f"paho's on_disconnect is not aiomqtt.Client._on_disconnect any more: {FORWARD} would "
        "leave publishes waiting for a PUBACK forever after a disconnect"
    )
    assert isinstance(getattr(client, "_disconnected", None), asyncio.Future), (
        f"aiomqtt.Client._disconnected is no longer a future: {FORWARD}.__aexit__ reads it"
    )
    assert inner._callback_api_version is paho.CallbackAPIVersion.VERSION2, (
        "aiomqtt no longer uses paho's callback API version 2, whose arguments "
        f"{FORWARD}._on_publish and _on_disconnect take"
    )


async def test_aiomqtt_hands_paho_socket_callbacks_to_methods_a_subclass_overrides() -> None:
    """AckingClient watches paho's socket itself (only while it is still paho's): aiomqtt must
    still route paho's socket callbacks through its methods and keep its misc loop's parts."""
    client = AckingClient(hostname="127.0.0.1")
    inner = client._client
    for name in ("on_socket_open", "on_socket_register_write"):
        method = getattr(inner, name)
        assert getattr(method, "__func__", None) is getattr(AckingClient, f"_{name}"), (
            f"paho's {name} is not aiomqtt.Client._{name} any more: {FORWARD}._{name} would "
            "be bypassed and a socket closed before the loop registers it would be watched"
        )
    assert inspect.iscoroutinefunction(getattr(client, "_misc_loop", None)), (
        f"aiomqtt.Client._misc_loop is gone: {FORWARD}._start_misc_loop runs it"
    )
    assert hasattr(client, "_misc_task"), f"aiomqtt.Client._misc_task is gone: {FORWARD}"
    assert isinstance(getattr(client, "_loop", None), asyncio.AbstractEventLoop), (
        f"aiomqtt.Client._loop is gone: {FORWARD} registers paho's socket on it"
    )


async def test_aiomqtt_keeps_received_messages_in_a_queue_verify_can_empty() -> None:
    """verify, when it stops or loses the broker, handles what paho already PUBACKed and
    aiomqtt queued (the broker will not send it again): it empties aiomqtt's queue itself."""
    client = aiomqtt.Client("127.0.0.1")
    queue = getattr(client, "_queue", None)
    assert isinstance(queue, asyncio.Queue), (
        "aiomqtt.Client._queue is no longer an asyncio.Queue: edge_agent/consumer/verify.py "
        "(_acknowledged) takes the messages left in it, which would otherwise be lost to verify"
    )


INGEST = "edge_agent/consumer/ingest/worker.py (Worker: PUBACK only after COMMIT)"


async def test_aiomqtt_lets_ingest_acknowledge_a_message_itself() -> None:
    """paho's manual acknowledgement, on the paho client aiomqtt wraps: a message is PUBACKed by
    `ack(mid, qos)` once it is committed, not when it is queued."""
    client = aiomqtt.Client("127.0.0.1")
    inner = getattr(client, "_client", None)
    assert isinstance(inner, paho.Client), (
        f"aiomqtt.Client._client is no longer the paho client: {INGEST} sets manual_ack on it"
    )
    assert parameters(inner.manual_ack_set) == ["on"], f"paho manual_ack_set changed: {INGEST}"
    assert parameters(inner.ack) == ["mid", "qos"], f"paho Client.ack changed: {INGEST}"
    inner.manual_ack_set(True)
    assert inner._manual_ack is True, (
        f"paho no longer keeps manual_ack: {INGEST} would PUBACK before COMMIT (loss on a crash)"
    )
    assert hasattr(aiomqtt.Message, "mid") or "mid" in parameters(aiomqtt.Message), (
        f"aiomqtt.Message carries no mid: {INGEST} acknowledges by it"
    )


def test_the_overridden_aiomqtt_callbacks_keep_their_arguments() -> None:
    on_publish = ["self", "client", "userdata", "mid", "reason_code", "properties"]
    assert parameters(aiomqtt.Client._on_publish) == on_publish, (
        f"aiomqtt.Client._on_publish changed its arguments, which {FORWARD} overrides"
    )
    on_disconnect = ["self", "client", "userdata", "flags", "reason_code", "properties"]
    assert parameters(aiomqtt.Client._on_disconnect) == on_disconnect, (
        f"aiomqtt.Client._on_disconnect changed its arguments, which {FORWARD} overrides"
    )


async def test_paho_publish_returns_its_result_code_and_message_id() -> None:
    client = AckingClient(hostname="127.0.0.1")
    info = client._client.publish("t", b"x", qos=1)  # not connected: refused, not sent
    assert info.rc == paho.MQTT_ERR_NO_CONN != paho.MQTT_ERR_SUCCESS, (
        f"paho's publish result has no .rc, or its codes changed: {FORWARD}.publish_acked"
    )
    assert isinstance(info.mid, int) and info.mid > 0, (
        f"paho's publish result has no .mid: {FORWARD}.publish_acked matches PUBACKs by it"
    )


def test_a_reason_code_gives_its_number_as_value() -> None:
    refused = ReasonCode(PacketTypes.PUBACK, "Not authorized")
    assert refused.value == 0x87, (
        f"paho's ReasonCode has no .value any more ({refused!r}): {FORWARD}._on_publish reads "
        "it, and a refused publish must never count as acknowledged"
    )


async def test_aiomqtt_hands_paho_on_connect_to_the_method_a_subclass_overrides() -> None:
    client = AckingClient(hostname="127.0.0.1")
    on_connect = client._client.on_connect
    assert getattr(on_connect, "__func__", None) is AckingClient._on_connect, (
        f"paho's on_connect is not aiomqtt.Client._on_connect any more: {FORWARD} would never "
        "see the CONNACK properties, so it would exceed the broker's Receive Maximum and "
        "Maximum Packet Size"
    )
    on_connect_args = ["self", "client", "userdata", "flags", "reason_code", "properties"]
    assert parameters(aiomqtt.Client._on_connect) == on_connect_args, (
        f"aiomqtt.Client._on_connect changed its arguments, which {FORWARD} overrides"
    )


def test_paho_says_whether_the_broker_sent_the_disconnect() -> None:
    assert "is_disconnect_packet_from_server" in paho.DisconnectFlags._fields, (
        f"paho's DisconnectFlags lost is_disconnect_packet_from_server: {FORWARD} "
        "(disconnect_cause) tells the broker's DISCONNECT reason (0x95 Packet too large evicts "
        "a batch at once) from paho's guess by it"
    )


def test_paho_decodes_a_puback_packet_too_large_once_the_client_allows_it() -> None:
    """Importing edge_agent.forward.client added PUBACK to the packets paho's ReasonCode.names
    table allows for 0x95, a code Mosquitto sends in a PUBACK though MQTT 5 lists it not."""
    code = ReasonCode(PacketTypes.PUBACK)
    code.unpack(bytes([0x95]))  # how paho reads the reason code of a PUBACK it received
    assert (code.value, code.getName()) == (0x95, "Packet too large"), (
        "paho's ReasonCode.names table or its lookup changed: "
        "edge_agent/forward/client.py (accept_puback_packet_too_large) no longer lets paho "
        "decode PUBACK 0x95, so paho drops the connection on it and the batch over Mosquitto's "
        "message_size_limit is re-sent forever instead of evicted as too_large"
    )


# asyncua 2.1: draining the subscription's queue in one go.


async def test_the_subscription_queue_is_the_one_next_event_reads() -> None:
    sub = Subscription(
        None,  # type: ignore[arg-type]  # the server is not used until a request is sent
        ua.CreateSubscriptionParameters(),
        None,
        queue_maxsize=7,
        overflow=OverflowPolicy.DISCONNECT,
    )
    queue = getattr(sub, "_event_queue", None)
    assert isinstance(queue, asyncio.Queue) and queue.maxsize == 7, (
        f"asyncua's Subscription._event_queue is gone or not the sized queue ({queue!r}): "
        f"{OPCUA} drains it to emit a whole publish at once"
    )
    event = object()
    sub._deliver(event)  # type: ignore[arg-type]  # how a publish response reaches the queue
    assert queue.get_nowait() is event, (
        f"asyncua no longer delivers notifications into Subscription._event_queue: {OPCUA} "
        "would drain an empty queue and lose nothing but emit one event at a time, or worse"
    )
    queue.put_nowait(event)
    assert await sub.next_event(timeout=0.01) is event, (
        f"Subscription.next_event no longer reads _event_queue: {OPCUA} mixes both"
    )
    assert await sub.next_event(timeout=0.01) is None, (
        f"Subscription.next_event no longer returns None on timeout: {OPCUA} relies on it to "
        "notice a lost connection"
    )
    await sub.delete()
    with pytest.raises(StopAsyncIteration):
        await sub.next_event(timeout=0.01)


def test_create_subscription_takes_the_queue_size_and_overflow_policy() -> None:
    keyword_only = [
        name
        for name, p in inspect.signature(Client.create_subscription).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert {"queue_maxsize", "overflow"} <= set(keyword_only), (
        f"asyncua's Client.create_subscription lost queue_maxsize or overflow: {OPCUA}"
    )
    assert OverflowPolicy.DISCONNECT.value == "disconnect", (
        f"asyncua's OverflowPolicy.DISCONNECT changed: {OPCUA} asks for a reconnect, never a "
        "silent drop, when it falls behind"
    )


def test_the_client_state_and_the_event_fields_the_source_reads() -> None:
    state = Client("opc.tcp://127.0.0.1:4840").uaclient.state
    assert isinstance(state, UaClientState) and UaClientState.CONNECTED.value == "connected", (
        f"asyncua's client.uaclient.state or its 'connected' value changed: {OPCUA} compares "
        "state.value with 'connected' to tell a quiet subscription from a lost connection"
    )
    assert {"data"} <= {f.name for f in dataclasses.fields(DataChangeEvent)}, OPCUA
    assert {"notification"} <= {f.name for f in dataclasses.fields(StatusChangeEvent)}, OPCUA
    item = ua.MonitoredItemNotification()
    assert hasattr(item, "ClientHandle") and hasattr(item, "Value"), OPCUA
    assert hasattr(ua.StatusChangeNotification(), "Status"), OPCUA


def test_the_client_internals_a_session_takeover_uses() -> None:
    """The takeover after a lost connection re-activates the old session on a new channel with
    the pieces asyncua's own auto-reconnect uses (asyncua has no public API for it)."""
    client = Client("opc.tcp://127.0.0.1:4840")
    for name in ("_server_nonce", "_policy_ids"):
        assert hasattr(client, name), (
            f"asyncua's Client.{name} is gone: {SESSION} keeps it in the ticket so the new "
            "ActivateSession signs the right nonce with the right user token policy"
        )
    activate = getattr(client, "_activate_with_credentials", None)
    assert inspect.iscoroutinefunction(activate) and parameters(activate) == [], (
        f"asyncua's Client._activate_with_credentials changed ({activate!r}): {SESSION} calls "
        "it to activate the old session; without it a one-session server refuses the agent "
        "for a whole session timeout"
    )
    session = client.uaclient.session
    for name in ("authentication_token", "restore_authentication_token"):
        assert hasattr(session, name), f"asyncua's UaSession.{name} is gone: {SESSION}"
    for name in ("connect_socket", "send_hello", "open_secure_channel", "disconnect_socket"):
        assert inspect.isroutine(getattr(client, name, None)), f"Client.{name}: {SESSION}"
    assert hasattr(client, "connection_lost_callback"), (
        f"asyncua's Client.connection_lost_callback is gone: {SESSION} LossWatch takes the "
        "supervisor's reason for a loss from it"
    )
    assert "on_connection_lost" in inspect.getsource(UASocketProtocol), (
        f"asyncua's UASocketProtocol.on_connection_lost is gone: {SESSION} LossWatch takes the "
        "socket's own error (a reset) from it, not the BadShutdown that follows"
    )


# pymodbus 3.16: one shared connection that only the link drops; word order and data types.


async def test_set_max_no_responses_is_what_drops_a_connection_after_timeouts() -> None:
    tcp = AsyncModbusTcpClient("127.0.0.1", port=1, timeout=1, retries=0, reconnect_delay=0)
    serial = AsyncModbusSerialClient(
        "/dev/null", baudrate=9600, parity="N", stopbits=1, bytesize=8,
        timeout=1, retries=0, reconnect_delay=0,
    )  # fmt: skip
    for client in (tcp, serial):
        client.set_max_no_responses(1_000_000)
        assert client.ctx.max_until_disconnect == 1_000_000, (
            f"pymodbus' set_max_no_responses no longer sets ctx.max_until_disconnect: {LINK} "
            "relies on it so a silent unit behind a gateway never drops the shared connection"
        )
        client.ctx.callback_connected()
        assert client.ctx.count_until_disconnect == 1_000_000, (
            f"pymodbus no longer refills count_until_disconnect on connect: {LINK}"
        )
        assert client.connected is False, f"pymodbus clients lost .connected: {LINK}"
    tcp.close()
    serial.close()


def test_the_read_methods_take_count_and_device_id() -> None:
    for name in ("read_coils", "read_discrete_inputs", "read_holding_registers",
                 "read_input_registers"):  # fmt: skip
        assert {"count", "device_id"} <= set(parameters(getattr(ModbusClientMixin, name))), (
            f"pymodbus' {name} no longer takes count= and device_id=: {LINK}"
        )
    refused = ExceptionResponse(3, exception_code=2)
    assert refused.isError() and refused.exception_code == 2, (
        f"pymodbus' ExceptionResponse changed: {LINK} reads isError() and exception_code"
    )


def test_convert_from_registers_and_its_data_types() -> None:
    names = ("INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "FLOAT32", "FLOAT64",
             "STRING")  # fmt: skip
    missing = [n for n in names if not hasattr(ModbusClientMixin.DATATYPE, n)]
    assert not missing, f"pymodbus' ModbusClientMixin.DATATYPE lost {missing}: {DECODE}"
    arguments = parameters(ModbusClientMixin.convert_from_registers)[:3]
    assert arguments == ["registers", "data_type", "word_order"], (
        f"pymodbus' convert_from_registers changed its arguments: {DECODE}"
    )
    int32 = ModbusClientMixin.DATATYPE.INT32
    assert ModbusClientMixin.convert_from_registers([0x0001, 0x0002], int32, "big") == 0x00010002
    assert ModbusClientMixin.convert_from_registers([0x0001, 0x0002], int32, "little") == (
        0x00020001
    ), f"pymodbus' word_order means something else now: {DECODE} (and the golden tests)"


# amqtt 0.12: the demo's embedded broker.

EMBEDDED = "edge_agent/demo/embedded_broker.py (EmbeddedBroker.start)"


def test_amqtt_restores_a_session_through_its_broker_context() -> None:
    from amqtt.broker import BrokerContext

    assert parameters(BrokerContext.__init__)[:2] == ["self", "broker"], (
        f"amqtt's BrokerContext(broker) changed: {EMBEDDED}"
    )
    assert parameters(BrokerContext.add_subscription) == ["self", "client_id", "topic", "qos"], (
        f"amqtt's BrokerContext.add_subscription changed: {EMBEDDED} re-creates the verifier's "
        "session with it after an outage, or the demo shows a hole"
    )
