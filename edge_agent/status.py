"""`edge-agent status`: the health endpoint's /status, shown for a person."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

EXIT_HEALTHY, EXIT_DEGRADED, EXIT_UNREACHABLE = 0, 1, 2


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"status url must be http:// or https://, not {url!r}")
    with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=timeout) as response:  # noqa: S310  # nosec B310  # scheme checked above
        data: dict[str, Any] = json.load(response)
        return data


def problems(status: dict[str, Any]) -> list[str]:
    """What makes the agent degraded: the broker unreachable, refusing batches or not
    acknowledging them (stalled), the buffer in trouble (a full disk, failing writes or deletes,
    sources held back), or a source down."""
    found = []
    if not status["mqtt"]["connected"]:
        found.append(f"broker not connected: {status['mqtt'].get('last_error') or 'connecting'}")
    if status["mqtt"].get("degraded"):
        found.append(f"batches not delivered: {status['mqtt']['degraded']}")
    if status["mqtt"].get("stalled"):
        found.append(f"broker not acknowledging: {status['mqtt']['stalled']}")
    found.extend(status["buffer"].get("problems", []))
    for name, source in status["sources"].items():
        if not source["up"]:
            found.append(f"source {name} down: {source.get('last_error') or 'starting'}")
    return found


def render(status: dict[str, Any]) -> str:
    buffer = status["buffer"]
    lines = [
        f"gateway   {status['gateway']}",
        f"broker    {'connected' if status['mqtt']['connected'] else 'DISCONNECTED'}",
        f"buffer    {buffer['readings']} readings, {buffer['bytes']} bytes, "
        f"oldest {buffer['oldest_age_s']:.1f}s",
    ]
    ack = status["mqtt"].get("ack") or {}
    if ack.get("mode") == "end_to_end":
        refused = sum(ack.get("refused", {}).values())
        lines.append(
            f"consumer  {ack.get('unacked_batches', 0)} batches sent, not yet acknowledged "
            f"(oldest {ack.get('unacked_oldest_age_s', 0.0):.1f}s); acknowledgements "
            f"{ack.get('accepted', 0)} accepted, {refused} refused"
        )
    if "drain" in buffer:
        lines.append(f"drain     {describe_drain(buffer['drain'])}")
    lines.extend(
        f"buffer    a bad buffer was moved aside at start: {q['moved_to']} "
        f"(epoch {q['epoch']}, last seq {q['last_seq']}): {q['reason']}"
        for q in buffer.get("quarantined", [])
    )
    clock = status.get("clock")  # agents before contract 1.14 have none
    if clock is not None:
        error = clock.get("error_ns")
        state = (
            "synchronised" + ("" if error is None else f" (error {error / 1e6:g} ms)")
            if clock["synced"]
            else "NOT synchronised: reading times are the gateway's guess"
        )
        steps = f", {clock['steps']} steps" if clock["steps"] else ""
        last = f", last {clock['last_step_s']:+.3f}s at {clock['last_step_at']}" if steps else ""
        lines.append(f"clock     {state}{steps}{last}")
    for name, source in status["sources"].items():
        state = "up" if source["up"] else f"DOWN ({source.get('last_error')})"
        lines.append(f"source    {name}: {state}, {source.get('readings', 0)} readings")
    return "\n".join(lines)


def describe_drain(drain: dict[str, Any]) -> str:
    """`1200.0 readings/s acknowledged (net -3.0/s over 10.0s), empty in 42.0s` (or `not
    draining`): /status `buffer.drain` in words."""
    eta = drain.get("eta_s")
    gone = "not draining" if eta is None else "empty" if eta == 0 else f"empty in {eta:.1f}s"
    return (
        f"{drain['acked_readings_s']:.1f} readings/s acknowledged "
        f"(net {drain['net_readings_s']:.1f}/s over {drain['window_s']:.1f}s), {gone}"
    )


def show_status(url: str, *, as_json: bool = False) -> int:
    try:
        status = fetch_status(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"edge-agent unreachable at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(status, indent=2) if as_json else render(status))
    issues = problems(status)
    for issue in issues:
        print(f"DEGRADED: {issue}", file=sys.stderr)
    return EXIT_DEGRADED if issues else EXIT_HEALTHY
