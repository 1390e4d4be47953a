"""Configuration of OPC UA sources: endpoint, security, authentication, subscription or polling.

Security is explicit: `security.policy` is required, and `None` must be written to run without
it. The deprecated policies (Basic128Rsa15, Basic256) are refused with the reason, so a config
copied from an old client fails at check-config rather than at the plant.

Node ids are parsed here, in both string forms of OPC 10000-6 §5.1.12 (`ns=<index>;<id>` and
`nsu=<namespace URI>;<id>`), without the protocol library, so check-config stays light; the
source resolves a URI to the server's current index at every connect.

A node entry with `count` is a block of nodes whose name and node id differ only in a number,
`{n}` (edge_agent.config.blocks): validation expands it, so `OpcuaSourceConfig.nodes` always
holds the nodes one by one.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

from pydantic import Field, SecretStr, field_validator, model_validator

from edge_agent.config.blocks import (
    MAX_BLOCK,
    check_name_or_pattern,
    collapse,
    duplicates,
    expand,
    has_placeholder,
    parse_pattern,
    where,
)
from edge_agent.config.types import (
    Duration,
    Name,
    StrictModel,
    read_secret,
)

DEFAULT_PKI_DIR = Path("/var/lib/edge-agent/opcua")
"""Where the client certificate, its key and the trust list live unless configured."""

SecurityPolicy = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]

DEPRECATED_POLICIES = {
    "Basic128Rsa15": "deprecated since OPC UA 1.04 (SHA-1, RSA PKCS#1 v1.5)",
    "Basic256": "deprecated since OPC UA 1.04 (SHA-1 signatures)",
}
_SUPPORTED = "Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss"


class OpcuaSecurity(StrictModel):
    """How the secure channel is protected and how the server is recognised."""

    policy: SecurityPolicy
    mode: Literal["None", "Sign", "SignAndEncrypt"] | None = None
    """Defaults to SignAndEncrypt with a policy, and to None with policy None."""
    server_certificate: Path | None = None
    """A pinned server certificate (DER or PEM): only this exact certificate is accepted."""
    trust_dir: Path | None = None
    """A directory of trusted server or CA certificates; defaults to `{pki_dir}/trusted`."""
    pki_dir: Path = DEFAULT_PKI_DIR
    client_certificate: Path | None = None
    """Defaults to `{pki_dir}/client-cert.der`, generated (self-signed) when absent."""
    client_key: Path | None = None
    """Defaults to `{pki_dir}/client-key.pem` (mode 0600), generated when absent."""

    @field_validator("policy", mode="before")
    @classmethod
    def _refuse_deprecated(cls, value: object) -> object:
        if isinstance(value, str) and value in DEPRECATED_POLICIES:
            raise ValueError(
                f"security policy {value} is refused: {DEPRECATED_POLICIES[value]}; "
                f"use {_SUPPORTED} (or None, written explicitly)"
            )
        return value

    @model_validator(mode="after")
    def _mode_matches_policy(self) -> OpcuaSecurity:
        if self.policy == "None" and self.mode not in (None, "None"):
            raise ValueError(f"mode {self.mode} needs a security policy, not None")
        if self.policy != "None" and self.mode == "None":
            raise ValueError(f"policy {self.policy} needs mode Sign or SignAndEncrypt")
        if self.server_certificate is not None and self.trust_dir is not None:
            raise ValueError("give server_certificate (a pin) or trust_dir, not both")
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together")
        return self

    @property
    def message_mode(self) -> Literal["None", "Sign", "SignAndEncrypt"]:
        if self.mode is not None:
            return self.mode
        return "None" if self.policy == "None" else "SignAndEncrypt"

    @property
    def certificate_path(self) -> Path:
        return self.client_certificate or self.pki_dir / "client-cert.der"

    @property
    def key_path(self) -> Path:
        return self.client_key or self.pki_dir / "client-key.pem"

    @property
    def trust_path(self) -> Path:
        return self.trust_dir or self.pki_dir / "trusted"

    @property
    def rejected_path(self) -> Path:
        """Where rejected server certificates are saved, ready to be moved into the trust list."""
        return self.pki_dir / "rejected"


class OpcuaAuth(StrictModel):
    """User identity: username and password, or an X.509 user certificate; anonymous if absent."""

    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _one_identity(self) -> OpcuaAuth:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if has_password and self.username is None:
            raise ValueError("a password needs a username")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.username is not None and self.certificate is not None:
            raise ValueError("give username or certificate, not both")
        if self.username is None and self.certificate is None:
            raise ValueError("give username (with password or password_file) or certificate")
        return self

    def password_value(self) -> str | None:
        return read_secret(self.password, self.password_file)


class Deadband(StrictModel):
    """A data-change filter: report only changes larger than `value` (units, or % of range)."""

    type: Literal["absolute", "percent"]
    value: float = Field(ge=0)

    @model_validator(mode="after")
    def _percent_range(self) -> Deadband:
        if self.type == "percent" and self.value > 100:
            raise ValueError("a percent deadband is between 0 and 100")
        return self


PLACEHOLDERS = ("n",)
"""What a node block's name and node id may use: the number in the block."""


class OpcuaNode(StrictModel):
    """One node, or with `count` a block of nodes whose name and node id differ in `{n}`."""

    name: str
    """A name; in a block, a pattern with `{n}` (edge_agent.config.blocks)."""
    node_id: str = Field(min_length=1)
    """A node id; in a block, a pattern with `{n}` (`{{` and `}}` for literal braces)."""
    sampling_interval: Duration | None = None
    """Overrides the source's `sampling_interval` for this node (subscribe mode)."""
    queue_size: int | None = Field(default=None, ge=1, le=10_000)
    deadband: Deadband | None = None
    unit: str | None = None
    count: int | None = Field(default=None, ge=1, le=MAX_BLOCK)
    """A block: this entry stands for `count` nodes, `{n}` running from `n_from`."""
    n_from: int | None = Field(default=None, ge=0)
    """In a block, the `{n}` of its first node (1 by default)."""

    @field_validator("name")
    @classmethod
    def _name_or_pattern(cls, value: str) -> str:
        return check_name_or_pattern(value, PLACEHOLDERS)

    @model_validator(mode="after")
    def _block_fits(self) -> OpcuaNode:
        """Without count, the name is plain and the node id literal; with it, both vary in n."""
        if self.count is None:
            if has_placeholder(self.name):
                raise ValueError(
                    "name has a placeholder but there is no count: give count for a block, "
                    "or write the name out"
                )
            if self.n_from is not None:
                raise ValueError("n_from applies to a block: give count")
            return self
        node_id = parse_pattern(self.node_id, PLACEHOLDERS)  # ValueError names what is wrong
        if self.count > 1 and not (has_placeholder(self.name) and node_id.fields):
            raise ValueError(f"a block of {self.count} nodes needs {{n}} in its name and node_id")
        return self


class OpcuaSourceConfig(StrictModel):
    type: Literal["opcua"]
    name: Name
    endpoint: str = Field(pattern=r"^opc\.tcp://[^/\s:]+(:\d{1,5})?(/\S*)?$")
    security: OpcuaSecurity
    auth: OpcuaAuth | None = None
    mode: Literal["subscribe", "poll"] = "subscribe"
    interval: Duration = 1.0
    """Publishing interval (subscribe) or read interval (poll)."""
    sampling_interval: Duration | None = None
    """How often the server samples each node (subscribe); defaults to `interval`."""
    queue_size: int = Field(default=10, ge=1, le=10_000)
    """Samples the server keeps per node between publishes, so no change is lost."""
    deadband: Deadband | None = None
    keepalive_count: int = Field(default=10, ge=1, le=1000)
    """Publishing intervals without data after which the server sends a keep-alive."""
    timeout: Duration = 10.0
    """Per-request timeout and connect timeout."""
    session_timeout: Duration = Field(default=30.0, ge=10.0, le=3600.0)
    """Requested session timeout: how long the server keeps our session once it hears nothing.
    A session left by a lost connection holds a server session slot this long if it cannot be
    taken over (servers that allow one session refuse the next with BadTooManySessions)."""
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 30.0
    nodes: list[OpcuaNode] = Field(min_length=1)
    """The nodes one by one: blocks are expanded where they stand (`expand_nodes`)."""

    @field_validator("nodes")
    @classmethod
    def _expand_blocks(cls, nodes: list[OpcuaNode]) -> list[OpcuaNode]:
        return expand_nodes(nodes)

    @model_validator(mode="after")
    def _mode_specific_keys(self) -> OpcuaSourceConfig:
        if self.mode == "poll":
            per_node = any(
                n.sampling_interval is not None or n.queue_size is not None or n.deadband
                for n in self.nodes
            )
            if self.deadband is not None or self.sampling_interval is not None or per_node:
                raise ValueError(
                    "sampling_interval, queue_size and deadband apply to mode subscribe only"
                )
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems, as (location relative to this source, message).

        A node of a block is located at its entry and index, `("nodes", 2, 7, "node_id")`;
        each problem of a block is reported once, with how many more nodes have it.
        """
        nodes = self.nodes
        found = duplicates([n.name for n in nodes], nodes, "nodes", "name")
        found += duplicates([n.node_id for n in nodes], nodes, "nodes", "node_id")
        checks: list[tuple[tuple[str | int, ...], str, str]] = []
        for index, node in enumerate(nodes):
            message = node_id_problem(node.node_id)
            if message is not None:
                checks.append(((*where(nodes, "nodes", index), "node_id"), message, "node_id"))
            if len(node.name) > 64:  # only a block's pattern can make one: names are checked
                long = f"name {node.name!r} is longer than 64 characters"
                checks.append(((*where(nodes, "nodes", index), "name"), long, "long"))
        return found + collapse(checks)

    def files_to_check(self) -> list[tuple[tuple[str | int, ...], Path]]:
        """Files that must exist before start; generated client keys and the trust dir are not."""
        files: list[tuple[tuple[str | int, ...], Path]] = []
        if self.security.server_certificate is not None:
            files.append((("security", "server_certificate"), self.security.server_certificate))
        if self.security.client_certificate is not None and self.security.client_key is not None:
            # Configured explicitly: the operator provides them, so they must exist.
            files.append((("security", "client_certificate"), self.security.client_certificate))
            files.append((("security", "client_key"), self.security.client_key))
        if self.auth is not None:
            for key in ("password_file", "certificate", "private_key"):
                path = getattr(self.auth, key)
                if path is not None:
                    files.append((("auth", key), path))
        return files


IdentifierType = Literal["i", "s", "g", "b"]

_EXAMPLES = "e.g. nsu=urn:example:plant;s=Tank.Level, ns=3;i=1001 or i=2258"
_GUID = re.compile(r"^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$")
_UINT32_MAX = 2**32 - 1
_UINT16_MAX = 2**16 - 1


@dataclass(frozen=True)
class NodeIdText:
    """A parsed node id string: its namespace (an index, or a URI to resolve) and identifier."""

    namespace: int | str
    """The namespace index (`ns=`, 0 when absent), or the namespace URI (`nsu=`)."""
    kind: IdentifierType
    identifier: int | str | uuid.UUID | bytes


def parse_node_id(text: str) -> NodeIdText:
    """Parse `[ns=<index>;|nsu=<uri>;]<i|s|g|b>=<identifier>` (OPC 10000-6 §5.1.12).

    In `nsu=` the URI's `;` and `%` are percent-encoded (`%3B`, `%25`). A string identifier
    takes the rest of the text, `;` included. Raises ValueError saying what is wrong.
    """
    namespace: int | str = 0
    rest = text
    if rest.startswith(("ns=", "nsu=")):
        prefix, sep, rest = rest.partition(";")
        if not sep:
            raise ValueError("the namespace must be followed by ';' and an identifier")
        key, _, value = prefix.partition("=")
        if key == "ns":
            if not (value.isascii() and value.isdigit()) or int(value) > _UINT16_MAX:
                raise ValueError(f"namespace index {value!r} is not a number from 0 to 65535")
            namespace = int(value)
        else:
            namespace = unquote(value, errors="strict")
            if not namespace:
                raise ValueError("the namespace URI after nsu= is empty")
    elif rest.startswith("srv="):
        raise ValueError("a server index (srv=) is not supported: give a node on this server")
    kind, sep, value = rest.partition("=")
    if not sep or kind not in ("i", "s", "g", "b"):
        raise ValueError(f"the identifier must start with i=, s=, g= or b=, not {rest[:8]!r}")
    return NodeIdText(namespace, kind, _identifier(kind, value))  # type: ignore[arg-type]


def _identifier(kind: str, value: str) -> int | str | uuid.UUID | bytes:
    if kind == "i":
        if not value.isascii() or not value.isdigit() or int(value) > _UINT32_MAX:
            raise ValueError(f"numeric identifier {value!r} is not a number from 0 to 2^32-1")
        return int(value)
    if kind == "s":
        if not value:
            raise ValueError("the string identifier after s= is empty")
        return value
    if kind == "g":
        if not _GUID.match(value):
            raise ValueError(f"GUID identifier {value!r} is not of the form 8-4-4-4-12 hex digits")
        return uuid.UUID(value)
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"opaque identifier {value!r} is not base64") from None
    if not decoded:
        raise ValueError("the opaque identifier after b= is empty")
    return decoded


def expand_nodes(entries: list[OpcuaNode]) -> list[OpcuaNode]:
    """The nodes `entries` stand for, in order: each block replaced by its nodes.

    A block's node `i` is the entry with name and node id filled in with `n = n_from + i`,
    every other key the same. Returns `entries` itself when it has no block, else an `Expanded`
    list that maps nodes back to entries; ValueError beyond MAX_POINTS nodes.
    """
    return expand(entries, "nodes", _block_nodes)


def _block_nodes(entry: OpcuaNode) -> list[OpcuaNode]:
    """The nodes of one block entry, name and node id filled in with each `n`."""
    assert entry.count is not None
    name = parse_pattern(entry.name, PLACEHOLDERS)
    node_id = parse_pattern(entry.node_id, PLACEHOLDERS)
    first = 1 if entry.n_from is None else entry.n_from
    nodes = []
    for n in range(first, first + entry.count):
        update = {"name": name.fill(n), "node_id": node_id.fill(n), "count": None, "n_from": None}
        nodes.append(entry.model_copy(update=update))
    return nodes


def node_id_problem(text: str) -> str | None:
    """Why `text` is not an OPC UA node id string, or None when it parses."""
    try:
        parse_node_id(text)
    except ValueError as exc:
        return f"invalid node id {text!r}: {exc}; expected {_EXAMPLES}"
    return None
