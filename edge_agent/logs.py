"""Logging set-up and the log levels of the libraries edge-agent uses: the one place both are set.

edge-agent logs one line per change of state itself. The libraries would repeat those lines on
every poll or publish: asyncua logs each publish response at INFO (costly at 10k items/s) and an
expected link loss as errors with tracebacks; pymodbus logs every failed connect and timeout.
So their loggers are turned down here, in three situations:
- a command that configures logging (`edge-agent run`, the demo) applies LIBRARY_LEVELS;
- a source whose library's logger nobody configured (a test, a benchmark, another program using
  the source) turns it to CRITICAL when it starts using the library (`quiet_unless_configured`):
  configure that logger first to see the library's own messages;
- the demo's own servers apply DEMO_OPCUA_SERVER_LEVELS and EMBEDDED_BROKER_LEVELS.
A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

LIBRARY_LEVELS: Mapping[str, int] = {
    "asyncua": logging.WARNING,
    "pymodbus": logging.WARNING,
    "aiohttp.access": logging.WARNING,
}
"""For a process whose logging edge-agent configures: warnings and errors only."""

DEMO_OPCUA_SERVER_LEVELS: Mapping[str, int] = {"asyncua": logging.ERROR}
"""The demo runs an asyncua server in the agent's process; it warns of every client that leaves."""

EMBEDDED_BROKER_LEVELS: Mapping[str, int] = {
    "amqtt": logging.ERROR,
    "transitions": logging.WARNING,  # amqtt's state machine
}
"""The demo's embedded broker (amqtt), which logs every connection."""


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr, one line per record, and turn the libraries down (LIBRARY_LEVELS)."""
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)
    set_levels(LIBRARY_LEVELS)


def set_levels(levels: Mapping[str, int]) -> None:
    """Set each named logger to its level."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def quiet_unless_configured(library: str) -> None:
    """Set `library`'s logger to CRITICAL unless it has a level already (someone configured it)."""
    logger = logging.getLogger(library)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)
