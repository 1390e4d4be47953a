"""Gateway public keys in the database: enrol, retire, list, and load as a TrustSet.

A gateway may have several keys (a rotation: the current one and the next, docs/security.md);
each key belongs to exactly one gateway, and a batch signed by it for another gateway is refused.
Validity (`not_before`, `not_after`) is judged on the batch's own signed `sealed` time, as
`verify --trust` does; a retired key is refused whatever the time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.seal.keys import key_id, load_public_key
from edge_agent.seal.trust import TrustedKey, TrustSet

Conn = psycopg.Connection[tuple[object, ...]]
BUMP_SQL = "SELECT nextval('gateway_keys_generation')"
"""Run in the transaction of every change to `gateway_keys`: workers reload on a new value."""
GENERATION_SQL = "SELECT last_value FROM gateway_keys_generation"


@dataclass(frozen=True)
class KeyRow:
    """One enrolled key as `keys list` shows it."""

    kid: bytes
    gateway: str
    not_before: datetime | None
    not_after: datetime | None
    retired_at: datetime | None
    added_at: datetime


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def add_key(
    conn: Conn,
    gateway: str,
    pem: Path,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> bytes:
    """Enrol the public key in `pem` (as `keygen` writes it) for `gateway`; return its kid.

    Enrolling the same key again for the same gateway updates its validity and un-retires it.
    Raises ValueError when the file is not an Ed25519 public key, the key belongs to another
    gateway, or not_after is before not_before.
    """
    if not gateway:
        raise ValueError("--gateway: empty")
    if not_before and not_after and not_after < not_before:
        raise ValueError("--not-after is before --not-before")
    key = load_public_key(pem)
    kid = key_id(key)
    with conn.transaction():
        row = conn.execute("SELECT gateway FROM gateway_keys WHERE kid = %s", (kid,)).fetchone()
        if row is not None and row[0] != gateway:
            raise ValueError(f"key id {kid.hex()} is already enrolled for gateway {row[0]}")
        conn.execute(
            "INSERT INTO gateway_keys (kid, gateway, public_key, not_before, not_after)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (kid) DO UPDATE SET"
            " not_before = EXCLUDED.not_before, not_after = EXCLUDED.not_after,"
            " retired_at = NULL",
            (kid, gateway, raw_public(key), not_before, not_after),
        )
        conn.execute(BUMP_SQL)
    return kid


def retire_key(conn: Conn, kid_hex: str) -> str:
    """Retire the key with this kid (16 hex digits); return its gateway.

    Raises ValueError when the kid is malformed or not enrolled.
    """
    try:
        kid = bytes.fromhex(kid_hex)
    except ValueError:
        kid = b""
    if len(kid) != 8:
        raise ValueError(f"--kid: {kid_hex!r} is not 16 hex digits")
    with conn.transaction():
        row = conn.execute(
            "UPDATE gateway_keys SET retired_at = coalesce(retired_at, now())"
            " WHERE kid = %s RETURNING gateway",
            (kid,),
        ).fetchone()
        conn.execute(BUMP_SQL)
    if row is None:
        raise ValueError(f"key id {kid_hex} is not enrolled")
    return str(row[0])


def list_keys(conn: Conn, gateway: str | None = None) -> list[KeyRow]:
    """The enrolled keys, by gateway then enrolment time."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT kid, gateway, not_before, not_after, retired_at, added_at FROM gateway_keys"
            " WHERE %(gw)s::text IS NULL OR gateway = %(gw)s ORDER BY gateway, added_at, kid",
            {"gw": gateway},
        ).fetchall()
    return [KeyRow(*row) for row in rows]  # type: ignore[arg-type]


@dataclass(frozen=True)
class GatewayTrust:
    """The keys a worker trusts, and the gateway each kid may sign for."""

    trust: TrustSet
    owners: dict[bytes, str]


def _ns(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1_000_000) * 1000


KEYS_SQL = "SELECT kid, gateway, public_key, not_before, not_after, retired_at FROM gateway_keys"
"""The query whose rows `trust_from_rows` takes."""


def trust_from_rows(rows: Iterable[tuple[object, ...]]) -> GatewayTrust:
    """The trust of the rows of KEYS_SQL (retired keys too: refused with that reason)."""
    keys: list[TrustedKey] = []
    owners: dict[bytes, str] = {}
    for kid, gateway, public, not_before, not_after, retired_at in rows:
        assert isinstance(kid, bytes) and isinstance(public, bytes)
        assert not_before is None or isinstance(not_before, datetime)
        assert not_after is None or isinstance(not_after, datetime)
        key = Ed25519PublicKey.from_public_bytes(public)
        keys.append(TrustedKey(key, kid, _ns(not_before), _ns(not_after), retired_at is not None))
        owners[kid] = str(gateway)
    return GatewayTrust(TrustSet(keys), owners)


def load_trust(conn: Conn) -> GatewayTrust:
    """Every enrolled key, from a synchronous connection."""
    with conn.transaction():
        return trust_from_rows(conn.execute(KEYS_SQL).fetchall())


def format_keys(rows: Iterable[KeyRow]) -> list[str]:
    """`keys list` lines: kid (16 hex digits), gateway, state, validity."""
    lines = []
    for row in rows:
        state = "retired" if row.retired_at else "active"
        valid = (
            f"{row.not_before.isoformat() if row.not_before else '-'}"
            f"..{row.not_after.isoformat() if row.not_after else '-'}"
        )
        lines.append(f"{row.kid.hex()}  {row.gateway}  {state}  valid={valid}")
    return lines
