"""The OPC UA session's life around a lost connection: why it was lost, and the session it left.

When the network path between the agent and a server is cut, the server usually does not notice:
its end of the connection stays open, and the session on it lives until the session timeout.
A server that allows one session (small embedded servers do) then refuses the agent's next
CreateSession with BadTooManySessions for that long. OPC 10000-4 §6.7 gives the way out: a
client may activate its existing session on a new secure channel. So before connecting afresh,
the source *takes over* the session its lost connection left behind (ActivateSession with that
session's authentication token on a new channel) and closes it, subscriptions included
(CloseSession with DeleteSubscriptions): the slot is free at once, and the new session is built
from scratch as on the first connect. The requested session timeout (`session_timeout`) bounds
the wait on servers that refuse the takeover.

The reason a connection was lost is taken where it happens: the socket's own error (a reset, the
server closing it) or the health probe getting no answer (a half-open path). asyncua then fails
the subscription with BadShutdown, which is not what happened; `LossWatch` keeps the first, true
reason for the logs.

asyncua 2.1 has this takeover inside its own auto-reconnect, which the source does not use (see
source.py); the few private attributes read here (`_server_nonce`, `_policy_ids`,
`_activate_with_credentials`) are the ones that machinery uses.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from dataclasses import dataclass

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.uaerrors import BadSessionClosed, BadSessionIdInvalid, UaStatusCodeError

from edge_agent.errors import EdgeAgentError
from edge_agent.sources.opcua.values import code_name


@dataclass(frozen=True)
class SessionTicket:
    """What it takes to activate a session again on another channel (OPC 10000-4 §5.6.3)."""

    token: ua.NodeId
    """The session's authentication token, which names it in every request."""
    nonce: bytes | None
    """The last server nonce: the new ActivateSession signs the server certificate and it."""
    policies: list[ua.UserTokenPolicy]
    """The endpoint's user token policies, so the identity token carries the right PolicyId."""
    expires: float
    """time.monotonic() after which the server has dropped the session anyway."""

    @classmethod
    def of(cls, client: Client) -> SessionTicket:
        """The ticket of `client`'s current session; it expires one session timeout from now
        (the server keeps a session that long after its last request)."""
        return cls(
            token=client.uaclient.session.authentication_token,
            nonce=client._server_nonce,
            policies=list(client._policy_ids),
            expires=time.monotonic() + client.session_timeout / 1000,
        )

    def renewed(self, timeout_s: float) -> SessionTicket:
        """The same ticket, expiring `timeout_s` from now (the session was just in use)."""
        return SessionTicket(self.token, self.nonce, self.policies, time.monotonic() + timeout_s)


class TakeOverError(EdgeAgentError):
    """The server has the old session but refused to let it be taken over."""


async def take_over(client: Client, ticket: SessionTicket) -> bool:
    """Activate the session of `ticket` on a new channel of `client`, then close it.

    Returns True when the server still had the session (now closed, its subscriptions deleted),
    False when it had already dropped it. Raises TakeOverError when the server refuses the
    activation, and transport errors as they come. `client` must be configured (security, user)
    and not connected; it is left disconnected, ready for `connect()`.
    """
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        client.uaclient.session.restore_authentication_token(ticket.token)
        client._server_nonce = ticket.nonce  # type: ignore[assignment]
        client._policy_ids = ticket.policies
        try:
            await client._activate_with_credentials()
        except (BadSessionIdInvalid, BadSessionClosed):
            return False
        except UaStatusCodeError as exc:
            raise TakeOverError(code_name(int(exc.code))) from exc
        with suppress(BadSessionClosed, BadSessionIdInvalid):
            await client.uaclient.close_session(True)
        return True
    finally:
        with suppress(Exception):
            await client.uaclient.close_secure_channel()
        client.disconnect_socket()
        client.uaclient.session.reset_authentication_token()
        client._server_nonce = None


async def close_session(client: Client, wait: float) -> bool:
    """Close `client`'s session and connection; True only when the server confirmed CloseSession.

    False means the session may live on at the server (the link was already gone, or no answer
    came within `wait` s): the caller keeps its ticket to take it over on the next connect.
    """
    protocol = client.uaclient.protocol
    confirmed = False
    if protocol is not None and not protocol.is_closed and client.uaclient.has_session:
        try:
            async with asyncio.timeout(wait):
                await client.close_session()
            confirmed = protocol is client.uaclient.protocol and not protocol.is_closed
        except Exception:  # noqa: BLE001 - any failure means "not confirmed", nothing more
            confirmed = False
    with suppress(Exception):
        async with asyncio.timeout(wait):
            await client.disconnect()  # stops asyncua's tasks; the session is already handled
    client.disconnect_socket()
    return confirmed


class LossWatch:
    """The first reason a connection was lost, as the socket or the health probe saw it.

    Attach it to a connected client. `reason` stays None while the connection is fine, and once
    set is not replaced: the first failure is the cause, what follows are its consequences.
    """

    def __init__(self, probe_timeout: float) -> None:
        self.reason: str | None = None
        self._probe_timeout = probe_timeout
        self._closing = False

    def attach(self, client: Client) -> None:
        """Hook the client's socket and its connection supervisor."""
        protocol = client.uaclient.protocol
        if protocol is not None:
            forward = protocol.on_connection_lost

            def socket_lost(exc: Exception | None) -> None:
                self.record(exc)
                if forward is not None:
                    forward(exc)

            protocol.on_connection_lost = socket_lost

        async def supervisor_lost(exc: Exception) -> None:
            self.record(exc)

        client.connection_lost_callback = supervisor_lost

    def closing(self) -> None:
        """From now on the connection is being closed on purpose: nothing more is a loss."""
        self._closing = True

    def record(self, exc: BaseException | None) -> None:
        """Keep the reason for `exc` (None: the peer closed the connection) unless one is kept."""
        if self.reason is None and not self._closing:
            self.reason = self.describe(exc)

    def describe(self, exc: BaseException | None) -> str:
        """A short reason: `connection reset`, `no answer for 2s`, `BadSessionIdInvalid (…)`."""
        if exc is None:
            return "the server closed the connection"
        if isinstance(exc, TimeoutError):
            return f"no answer for {self._probe_timeout:g}s"
        return describe_error(exc)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for logs and /status: the status name for OPC UA errors, plain words
    for the connection's (`connection reset`), the text of anything else."""
    if isinstance(exc, UaStatusCodeError):
        return code_name(int(exc.code))
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, ConnectionAbortedError | BrokenPipeError):
        return "connection broken"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__
