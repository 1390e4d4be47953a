"""The exception tree of edge-agent: every exception class of the package is in it.

    EdgeAgentError
    ├── ConfigError                the configuration is invalid; carries every problem found
    ├── StoreError                 the SQLite buffer cannot be opened or written
    ├── EnvelopeError              a batch cannot be decoded or its signature does not verify
    │   ├── UnknownKeyError        the batch names a key id the verifier was not given
    │   ├── KeyNotValidError       signed by a retired key, or sealed outside the key's validity
    │   ├── NonconformingError     signed, but a reading breaks the value rules (ingest refuses it)
    │   ├── CatalogueMissingError  signed, but its point catalogue has not arrived: keep it, wait
    │   ├── CatalogueError         a point catalogue message that is not as §4.12 says
    │   ├── CBORShapeError         untrusted CBOR malformed, or too costly a shape to build
    │   └── TooLargeError (ValueError)  a zstd frame holding more than the bound allows
    ├── CatalogueTooLargeError (ValueError)  no catalogue a consumer takes holds the points
    ├── AckError                   a consumer acknowledgement refused; `reason` says why (§4.10)
    ├── DeviceError                a device failed to answer a read (timeout, exception, garbage)
    │   └── ReadError              a Modbus read failed; `reason` names its counter
    │       ├── ReadTimeoutError       no answer within the timeout
    │       ├── ShortResponseError     fewer registers or bits than asked for
    │       ├── MalformedError         an answer that does not belong to the request
    │       ├── FramingError           bytes on an RTU line with no valid frame in them
    │       ├── LinkDownError          the connection or serial line is down
    │       └── ExceptionReplyError    a Modbus exception response; carries its code
    ├── FrameError                 Modbus bytes that are not the answer to the request in flight
    │   ├── TcpFramingError (ValueError)       not an MBAP frame: the TCP stream is lost
    │   ├── MismatchedAnswerError (ValueError) a frame that answers another request
    │   ├── ExceptionAnswer            a Modbus exception response, before it names the device
    │   └── GarbledAnswerError         no RTU frame with a valid CRC by the timeout
    ├── ChannelLostError           a Modbus connection or port closed under a request
    ├── PortError                  a serial port cannot be opened; says which setting or why
    ├── RejectedValue (ValueError)  a device value the value rules refuse (NaN, text not UTF-8)
    │   └── DecodeError            Modbus registers that hold no value the rules allow
    ├── ConnectionLostError        an OPC UA session or its subscription is gone
    ├── UnknownNamespaceError      an `nsu=` node id names a URI the OPC UA server does not have
    ├── TakeOverError              the OPC UA server refused the takeover of a lost session
    ├── SecurityError              an OPC UA connection refused on security grounds
    │   └── UntrustedCertificateError  the server's certificate is not trusted
    ├── PublishRejectedError       the broker refused a batch (PUBACK reason >= 0x80)
    │   └── CatalogueOverLimitError  a point catalogue over the broker's packet limit
    ├── TransactionRetryError      ingest: PostgreSQL aborted a transaction for concurrency; again
    ├── OverlapError               ingest: another worker committed readings a group copied; again
    ├── StoppedWaitingError        ingest: told to stop while waiting for PostgreSQL
    └── BrokerUnavailableError (RuntimeError)  the demo finds no MQTT broker to run

Classes live next to the code that raises them: ConfigError, StoreError, EnvelopeError,
UnknownKeyError and DeviceError here; the ReadError family, ChannelLostError,
GarbledAnswerError and PortError in `sources/modbus/link.py`, FrameError and its other
subclasses in `sources/modbus/frames.py`, RejectedValue in `reading.py`,
DecodeError in `sources/modbus/decode.py`, KeyNotValidError in `seal/trust.py`,
AckError in `seal/ack.py`, ConnectionLostError in `sources/opcua/source.py`,
UnknownNamespaceError in `sources/opcua/namespaces.py`, TakeOverError in `sources/opcua/session.py`,
SecurityError and UntrustedCertificateError in `sources/opcua/security.py`,
PublishRejectedError and CatalogueOverLimitError in `forward/mqtt.py`,
BrokerUnavailableError in `demo/embedded_broker.py`,
NonconformingError in `consumer/ingest/rows.py`, CatalogueMissingError in `seal/columnar.py`,
CatalogueError in `seal/catalogue.py`, CatalogueTooLargeError in `seal/columnar.py`
(the batch then carries its own points), CBORShapeError in `seal/cbor_in.py`, TooLargeError in
`seal/unzstd.py`, TransactionRetryError and StoppedWaitingError in
`consumer/ingest/worker.py` (they never leave the worker), OverlapError in
`consumer/ingest/write.py`.
A second base in parentheses is kept for callers that catch it.

Only ConfigError stops the daemon before start; device and connection errors never leave their
source; PublishRejectedError and StoreError make the forwarder reconnect and re-send.
"""

from __future__ import annotations

from dataclasses import dataclass


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration file, located as precisely as we can."""

    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def render(self, filename: str) -> str:
        where = filename if self.line is None else f"{filename}:{self.line}:{self.column}"
        return f"{where}: {self.path or '(top)'}: {self.message}"


class ConfigError(EdgeAgentError):
    """The configuration is invalid; `problems` lists every problem, not just the first."""

    def __init__(self, filename: str, problems: list[ConfigProblem]) -> None:
        self.filename = filename
        self.problems = problems
        super().__init__("\n".join(p.render(filename) for p in problems))


class StoreError(EdgeAgentError):
    """The buffer cannot be opened or written; `disk_full` when SQLite said SQLITE_FULL."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        self.disk_full = disk_full
        super().__init__(message)


class EnvelopeError(EdgeAgentError):
    """A sealed batch cannot be decoded or fails verification."""


class UnknownKeyError(EnvelopeError):
    """A batch is signed with a key id the verifier does not know."""


class DeviceError(EdgeAgentError):
    """A device read failed; names the device and what was asked of it."""

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(f"{device}: {message}")
