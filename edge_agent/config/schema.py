"""The configuration models of docs/contract.md §2: one file describes the whole agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator

from edge_agent.config.modbus import ModbusSourceConfig, shared_link_problems
from edge_agent.config.opcua import OpcuaSourceConfig
from edge_agent.config.simulated import SimulatedSourceConfig
from edge_agent.config.types import Duration, Name, StrictModel, duplicate_problems, read_secret

SourceConfig = Annotated[
    ModbusSourceConfig | OpcuaSourceConfig | SimulatedSourceConfig, Field(discriminator="type")
]


class GatewayConfig(StrictModel):
    id: Name


class StoreConfig(StrictModel):
    path: Path = Path("/var/lib/edge-agent/buffer.db")
    max_bytes: ByteSize = ByteSize(2 * 1024**3)
    max_age: Duration = 7 * 86400.0

    @field_validator("max_bytes")
    @classmethod
    def _at_least_a_mebibyte(cls, value: ByteSize) -> ByteSize:
        if value < 1024**2:
            raise ValueError("must be at least 1MiB")
        return value


class TlsConfig(StrictModel):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


MQTT_MAX_PACKET = 268_435_460
"""MQTT's own limit on a packet: a 1-byte header, 4 length bytes and 268,435,455 bytes (§2.2.3)."""


class MqttConfig(StrictModel):
    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = Field(default="edge", pattern=r"^[^#+\s]+$")
    client_id: str | None = Field(default=None, max_length=128)
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    keepalive: Annotated[Duration, Field(ge=1, le=65535)] = 30.0
    max_inflight: int = Field(default=32, ge=1, le=1000)
    max_packet_size: ByteSize | None = Field(default=None, ge=512, le=MQTT_MAX_PACKET)
    """The largest PUBLISH packet the broker accepts, for one that does not advertise it."""
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 5.0
    """Ceiling of the delay while the broker cannot be reached (no CONNACK)."""
    reconnect_max_stalled: Duration = 60.0
    """Ceiling of the delay while the broker accepts connections but takes no batch."""
    ack: Literal["broker", "end_to_end"] = "broker"
    """When a batch leaves the buffer: at the broker's PUBACK, or once a consumer's signed
    acknowledgement covers it (docs/contract.md §4.10)."""
    ack_keys: list[Path] = Field(default_factory=list, max_length=64)
    """The consumers' Ed25519 public keys (PEM) whose acknowledgements are accepted."""
    ack_timeout: Duration = 30.0
    """A batch PUBACKed but not acknowledged by a consumer within this is sent again."""
    heartbeat: Annotated[Duration, Field(ge=1, le=3600)] = 10.0
    """How often the signed high-water mark is published (and on every connect)."""
    ack_stall: Annotated[Duration, Field(ge=0.1, le=3600)] = 5.0
    """PUBACKs overdue this long while batches wait make the forwarder degraded (a stall)."""

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int | float) else value

    @field_validator("url")
    @classmethod
    def _url_is_mqtt(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"scheme must be mqtt:// or mqtts://, not {parts.scheme or 'none'}")
        if parts.username is not None or parts.password is not None:
            # Refused, not used: a URL is printed in logs, /status and error messages.
            raise ValueError(
                "credentials in the url are refused (a url is logged and shown); "
                "give mqtt.username and mqtt.password_file instead"
            )
        if not parts.hostname:
            raise ValueError("url needs a host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid port: {exc}") from None
        if port == 0:
            raise ValueError("port 0 is not a broker port")
        return value

    @model_validator(mode="after")
    def _one_password(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.tls is not None and not self.url.startswith("mqtts://"):
            raise ValueError("tls needs an mqtts:// url")
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems of `mqtt:`, as (key path below mqtt, message)."""
        if self.ack == "end_to_end" and not self.ack_keys:
            return [(("ack_keys",), "ack: end_to_end needs at least one consumer public key file")]
        return []

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith("mqtts://")

    def password_value(self) -> str | None:
        return read_secret(self.password, self.password_file)


class BatchConfig(StrictModel):
    max_readings: int = Field(default=1000, ge=1, le=100_000)
    max_delay: Duration = 1.0
    compression: Literal["zstd", "none"] = "zstd"
    format: Literal[1, 2] = 2
    """Payload format (docs/contract.md §4.3, §4.9): 2 columns, 1 a CBOR map per reading."""
    catalogue: bool = True
    """Format 2: send the points' names and types once, in a retained point catalogue, and
    reference it from the batches (docs/contract.md §4.12); false: every batch carries its own
    (for consumers older than 2.4). Format 1 has no catalogue: leaving this unset there is
    fine, setting it true is refused (`problems`)."""
    queue_readings: int = Field(default=100_000, ge=1000)

    @property
    def uses_catalogue(self) -> bool:
        """Whether the batches reference a point catalogue: format 2 with `catalogue` on."""
        return self.format == 2 and self.catalogue

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems of `batch:`, as (key path below batch, message).

        `catalogue: true` written out with `format: 1` is refused rather than ignored: the file
        asks for something format 1 cannot do (the default, unset, is simply not used there).
        """
        if self.format == 1 and self.catalogue and "catalogue" in self.model_fields_set:
            return [(("catalogue",), "catalogue: true needs format: 2 (format 1 has no catalogue)")]
        return []


class SigningConfig(StrictModel):
    key_file: Path = Path("/etc/edge-agent/signing.key")


class HealthConfig(StrictModel):
    listen: str = Field(default="127.0.0.1:8710", pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$")

    @field_validator("listen")
    @classmethod
    def _port_in_range(cls, value: str) -> str:
        if not 1 <= int(value.rsplit(":", 1)[1]) <= 65535:
            raise ValueError("port must be 1-65535")
        return value

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


class LogConfig(StrictModel):
    """`log:`: the agent's own level; a reload applies it (docs/contract.md §2)."""

    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(StrictModel):
    gateway: GatewayConfig
    store: StoreConfig = StoreConfig()
    mqtt: MqttConfig = MqttConfig()
    batch: BatchConfig = BatchConfig()
    signing: SigningConfig = SigningConfig()
    health: HealthConfig = HealthConfig()
    log: LogConfig = LogConfig()
    sources: list[SourceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _state_beside_the_buffer(self) -> Config:
        """OPC UA client keys default to the state directory: the buffer's, `{store}/opcua`.

        So an agent whose buffer lives in a directory it may write needs no other one.
        """
        sources: list[ModbusSourceConfig | OpcuaSourceConfig | SimulatedSourceConfig] = []
        for source in self.sources:
            if isinstance(source, OpcuaSourceConfig) and (
                "pki_dir" not in source.security.model_fields_set
            ):
                security = source.security.model_copy(
                    update={"pki_dir": self.store.path.parent / "opcua"}
                )
                source = source.model_copy(update={"security": security})  # noqa: PLW2901
            sources.append(source)
        return self.model_copy(update={"sources": sources})

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems across the whole file, as (key path, message)."""
        found = duplicate_problems([s.name for s in self.sources], "sources", "name")
        for index, source in enumerate(self.sources):
            found.extend((("sources", index, *loc), msg) for loc, msg in source.problems())
        found.extend(shared_link_problems(self.sources))
        found.extend((("mqtt", *loc), msg) for loc, msg in self.mqtt.problems())
        found.extend((("batch", *loc), msg) for loc, msg in self.batch.problems())
        return found

    def files_to_check(self) -> list[tuple[tuple[str | int, ...], Path]]:
        """Every file the agent will read at start, with its key path, for `check_files`."""
        files: list[tuple[tuple[str | int, ...], Path]] = [
            (("signing", "key_file"), self.signing.key_file)
        ]
        if self.mqtt.password_file is not None:
            files.append((("mqtt", "password_file"), self.mqtt.password_file))
        if self.mqtt.tls is not None:
            for key in ("ca_file", "cert_file", "key_file"):
                path = getattr(self.mqtt.tls, key)
                if path is not None:
                    files.append((("mqtt", "tls", key), path))
        files.extend((("mqtt", "ack_keys", i), path) for i, path in enumerate(self.mqtt.ack_keys))
        for index, source in enumerate(self.sources):
            extra = getattr(source, "files_to_check", None)
            if extra is not None:
                files.extend((("sources", index, *loc), path) for loc, path in extra())
        return files
