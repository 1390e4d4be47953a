"""The settings of an `ingest run` worker: command-line options over an optional YAML file.

The file (`--config FILE`) is a mapping of the same names as the options, with `_` for `-`:

    url: mqtts://broker.example:8883
    dsn: host=db.example dbname=edge user=ingest   # the password from ~/.pgpass or PGPASSWORD
    group: ingest
    ack_key: /etc/edge-agent/ingest.key
    topic_prefix: edge
    client_id: ingest-worker-1
    ca_file: /etc/ssl/certs/ca.pem
    username: ingest
    password_file: /etc/edge-agent/mqtt-password
    max_group: 64
    ack_interval: 0.5

An option given on the command line wins over the file. Unknown keys are errors.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edge_agent.yaml_file import read_yaml_file


@dataclass(frozen=True)
class IngestSettings:
    """What one worker needs. Durations in seconds."""

    url: str = "mqtt://127.0.0.1:1883"
    dsn: str = ""
    group: str = "ingest"
    """The shared subscription's name: workers of one group share the stream."""
    ack_key: str | None = None
    """The consumer's Ed25519 private key (PEM, from `edge-agent keygen`); None: no end-to-end
    acknowledgement is published."""
    topic_prefix: str = "edge"
    client_id: str = ""
    """The MQTT client id (a persistent session): unique per worker. Empty: derived from the
    group and the host name, which suits one worker per host."""
    ca_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    max_group: int = 64
    """Messages written in one transaction at most (bounded by the broker's in-flight limit)."""
    ack_interval: float = 0.5
    """The least time between two acknowledgements of one (gateway, epoch)."""
    keys_refresh: float = 10.0
    """How often the gateway keys are read again from the database."""
    rejected_keep: int = 10_000
    """Rejected messages kept (the newest); each with at most 4 KiB of its payload."""

    def mqtt_client_id(self) -> str:
        """The client id to connect with."""
        return self.client_id or f"edge-agent-ingest-{self.group}-{socket.gethostname()}"


_NAMES = {f.name for f in fields(IngestSettings)}


def load_settings(args: argparse.Namespace) -> IngestSettings:
    """Settings from `args` (attributes named as the fields; None: not given) over `args.config`.

    Raises ValueError naming the file and key, or the option, that is wrong; OSError when the
    file cannot be read.
    """
    values: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config:
        values.update(_read_file(Path(config)))
    for name in _NAMES:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    settings = IngestSettings(**values)
    _check(settings, config or "the command line")
    return settings


def _read_file(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path)  # at most 1 MiB, no aliases
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    unknown = sorted(str(k) for k in data if k not in _NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown key {', '.join(unknown)}")
    for name in ("max_group", "rejected_keep"):
        if name in data and type(data[name]) is not int:
            raise ValueError(f"{path}: {name}: expected an integer")
    for name in ("ack_interval", "keys_refresh"):
        if name in data and not isinstance(data[name], int | float):
            raise ValueError(f"{path}: {name}: expected a number of seconds")
    for name in _NAMES - {"max_group", "rejected_keep", "ack_interval", "keys_refresh"}:
        if name in data and data[name] is not None and not isinstance(data[name], str):
            raise ValueError(f"{path}: {name}: expected text")
    return data


def _check(settings: IngestSettings, where: str) -> None:
    if not settings.dsn:
        raise ValueError(f"{where}: no --dsn (PostgreSQL connection string) given")
    if not settings.url.startswith(("mqtt://", "mqtts://")):
        raise ValueError(f"{where}: url: expected mqtt:// or mqtts://, got {settings.url!r}")
    if "@" in settings.url.split("//", 1)[-1].split("/", 1)[0]:
        raise ValueError(f"{where}: url: credentials in the URL are not allowed; use username")
    for name in ("group", "topic_prefix"):
        value = getattr(settings, name)
        if not value or any(c in value for c in "#+ /" if name == "group" or c != "/"):
            raise ValueError(f"{where}: {name}: {value!r} is empty or has #, + or a space")
    if not 1 <= settings.max_group <= 10_000:
        raise ValueError(f"{where}: max_group: between 1 and 10000")
    if settings.rejected_keep < 1:
        raise ValueError(f"{where}: rejected_keep: at least 1")
    if settings.ack_interval < 0 or settings.keys_refresh <= 0:
        raise ValueError(f"{where}: ack_interval and keys_refresh: positive seconds")
