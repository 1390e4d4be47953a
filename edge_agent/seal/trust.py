"""The keys a consumer trusts: each by key id, with a validity, and retired keys refused.

Rotation without loss (docs/security.md) needs a consumer to trust the current key and the next
one at the same time: the gateway's buffer may still hold batches sealed with the old key when it
starts signing with the new one. A trust file lists them:

    keys:
      - public_key: site1-2026.pub          # PEM SPKI (a path relative to this file)
        kid: 0123456789abcdef               # optional: checked against the key
        not_before: 2026-01-01T00:00:00Z    # optional: batches sealed earlier are refused
        not_after: 2027-01-01T00:00:00Z     # optional: batches sealed later are refused
        retired: false                      # optional: true refuses every batch of this key

Validity is judged on the batch's own `sealed` time (signed with it), so a backlog sealed before
`not_after` and delivered later is still accepted. Retire a key only once the gateways' buffers
hold nothing it signed: a retired key is refused whatever the time, which is what to do with a
key that leaked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import EnvelopeError
from edge_agent.seal.keys import key_id, load_public_key

_ENTRY_KEYS = frozenset({"public_key", "kid", "not_before", "not_after", "retired"})


class KeyNotValidError(EnvelopeError):
    """A batch signed by a trusted key that is retired, or sealed outside the key's validity."""


@dataclass(frozen=True)
class TrustedKey:
    """One trusted public key and when it may sign (Unix ns, inclusive; None: no limit)."""

    key: Ed25519PublicKey
    kid: bytes
    not_before_ns: int | None = None
    not_after_ns: int | None = None
    retired: bool = False

    def refusal(self, sealed_ns: int) -> str | None:
        """Why a batch sealed at `sealed_ns` with this key is refused, or None."""
        if self.retired:
            return f"key id {self.kid.hex()} is retired"
        if self.not_before_ns is not None and sealed_ns < self.not_before_ns:
            return f"batch sealed {_iso(sealed_ns)}, before key id {self.kid.hex()} was valid"
        if self.not_after_ns is not None and sealed_ns > self.not_after_ns:
            return f"batch sealed {_iso(sealed_ns)}, after key id {self.kid.hex()} expired"
        return None


class TrustSet:
    """Trusted keys by key id; `check` refuses what a retired or out-of-date key signed."""

    def __init__(self, keys: Iterable[TrustedKey]) -> None:
        self.keys: Mapping[bytes, TrustedKey] = {k.kid: k for k in keys}

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey]) -> TrustSet:
        """Keys trusted without limits (`verify --key`)."""
        return cls(TrustedKey(k, key_id(k)) for k in keys)

    def public_keys(self) -> list[Ed25519PublicKey]:
        """Every key, retired ones too: a signature is verified before its key is judged."""
        return [k.key for k in self.keys.values()]

    def check(self, kid: bytes, sealed_ns: int) -> None:
        """Raise KeyNotValidError when the batch's key may not have sealed it."""
        trusted = self.keys.get(kid)
        if trusted is None:
            raise KeyNotValidError(f"unknown key id {kid.hex()}")
        reason = trusted.refusal(sealed_ns)
        if reason is not None:
            raise KeyNotValidError(reason)

    @classmethod
    def load(cls, path: Path) -> TrustSet:
        """Read a trust file; ValueError names the entry and key of every mistake."""
        # A consumer's file: imported here, so that the agent never loads PyYAML for it.
        from edge_agent.yaml_file import read_yaml_file  # noqa: PLC0415

        data = read_yaml_file(path, "a YAML trust file")  # at most 1 MiB, no aliases
        if not (
            isinstance(data, dict) and set(data) == {"keys"} and isinstance(data["keys"], list)
        ):
            raise ValueError(f"{path}: expected a mapping with one key, `keys:`, a list")
        keys = [_entry(path, index, entry) for index, entry in enumerate(data["keys"])]
        if not keys:
            raise ValueError(f"{path}: keys: the list is empty")
        seen: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            if key.kid in seen:
                raise ValueError(
                    f"{path}: keys[{index}]: key id {key.kid.hex()} is also keys[{seen[key.kid]}]"
                )
            seen[key.kid] = index
        return cls(keys)


def _entry(path: Path, index: int, entry: Any) -> TrustedKey:
    where = f"{path}: keys[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping")
    unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {', '.join(unknown)}")
    if not isinstance(entry.get("public_key"), str):
        raise ValueError(f"{where}.public_key: required, the path of a PEM public key")
    key_path = path.parent / entry["public_key"]
    try:
        key = load_public_key(key_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}.public_key: cannot load {key_path}: {exc}") from None
    kid = key_id(key)
    if "kid" in entry and str(entry["kid"]).lower() != kid.hex():
        raise ValueError(f"{where}.kid: {entry['kid']} is not the key's id {kid.hex()}")
    retired = entry.get("retired", False)
    if not isinstance(retired, bool):
        raise ValueError(f"{where}.retired: expected true or false")
    not_before = _time(where, "not_before", entry.get("not_before"))
    not_after = _time(where, "not_after", entry.get("not_after"))
    if not_before is not None and not_after is not None and not_before > not_after:
        raise ValueError(f"{where}: not_before is after not_after")
    return TrustedKey(key, kid, not_before, not_after, retired)


def _time(where: str, name: str, value: object) -> int | None:
    """A YAML timestamp (or ISO 8601 text; UTC unless it names a zone) as Unix ns."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{where}.{name}: not an ISO 8601 time: {value!r}") from None
    if not isinstance(value, datetime):
        raise ValueError(f"{where}.{name}: expected a time such as 2026-01-01T00:00:00Z")
    if value.tzinfo is None:  # no zone given: UTC
        value = value.replace(tzinfo=UTC)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _iso(ns: int) -> str:
    try:
        return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ns} ns"
