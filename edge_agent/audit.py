"""Audit events (IEC 62443-4-2 CR 2.8, 2.9): one structured log record per security event.

Every event is one record on the `edge_agent.audit` logger, with the time, a category from
CATEGORIES, an outcome and identifiers (which source, key id, broker, file: never a secret), as
text for people (`Audit category=... outcome=... time=... key=value`) and as a dict in the
record's `audit` attribute for structured handlers. Each event also counts in COUNTS, which
`/metrics` exposes as `edge_agent_audit_events_total{category,outcome}` (metrics.AuditCollector).

Callers pass identifiers, not secrets: a value is quoted when it has spaces, and text that looks
like a URL with credentials has them replaced by `***` as a last line of defence.

A leaf module: it imports nothing of the package, so every component can call `audit`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Literal

log = logging.getLogger("edge_agent.audit")

Category = Literal[
    "authentication",  # a peer refused our credentials (broker, OPC UA server)
    "certificate",  # a certificate refused (OPC UA server certificate, broker TLS)
    "config",  # a configuration refused (at start, or at a reload)
    "reload",  # a configuration reloaded
    "key",  # the signing key loaded, rotated or refused
    "store",  # the buffer quarantined (corrupt), or refused
    "eviction",  # unsent readings evicted by retention
    "acknowledgement",  # an acknowledgement refused (a broker PUBACK with a failure code, ...)
    "publish",  # a publish refused by the broker
    "health",  # a request to the health endpoint refused (connection limit)
]
"""The categories of audit events; one per kind of security-relevant change or refusal."""

Outcome = Literal["success", "failure", "refused"]

_LOSS = frozenset({"eviction", "store"})
"""Categories whose events are warnings even when the action succeeded: data was given up."""

COUNTS: Counter[tuple[str, str]] = Counter()
"""Events so far in this process, by (category, outcome)."""

_CREDENTIALS_IN_URL = re.compile(r"(\w+://)[^/@\s]*@")


def audit(category: Category, outcome: Outcome, **identifiers: object) -> dict[str, object]:
    """Log one audit event and count it; return the event as a dict (for tests and callers).

    `identifiers` name what the event is about (`source=`, `kid=`, `file=`, `error=`); they must
    not carry secrets. None values are left out.
    """
    now = time.time()
    event: dict[str, object] = {
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "category": category,
        "outcome": outcome,
    }
    event.update({k: _scrub(v) for k, v in identifiers.items() if v is not None})
    COUNTS[(category, outcome)] += 1
    warn = outcome != "success" or category in _LOSS
    level = logging.WARNING if warn else logging.INFO
    text = " ".join(f"{key}={_quote(value)}" for key, value in event.items())
    log.log(level, "Audit %s", text, extra={"audit": event})
    return event


def _scrub(value: object) -> object:
    if isinstance(value, str):
        return _CREDENTIALS_IN_URL.sub(r"\1***@", value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text
