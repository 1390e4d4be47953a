"""Logging set-up and the log levels of the libraries edge-agent uses: the one place both are set.

Formats (docs/contract.md §1, `run --log-format`), each one line per event:
- `text`: `TIME LEVEL logger: message`, for a terminal or a file;
- `journal`: `<N>logger: message` with the syslog priority N (sd-daemon(3)) and no timestamp,
  which journald adds itself; chosen by `auto` when stderr is the journal (`JOURNAL_STREAM`
  names stderr's device and inode, as systemd.exec(5) says);
- `json`: one JSON object per line (`ts`, `level`, `logger`, `message`, `exception` for a bug),
  for log shippers.
A message or traceback that spans lines is folded onto one (newlines shown as `\\n`), so that a
shipper or journald never splits one event into several. Expected faults are logged without a
traceback by the code that meets them; only bugs (log.exception) carry one.

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

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Literal

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

LogFormat = Literal["auto", "text", "journal", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "text", "journal", "json")

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
"""The names `log.level` accepts (docs/contract.md §2), lower case."""

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

_HANDLER_NAME = "edge-agent"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def one_line(text: str) -> str:
    """`text` with its line breaks shown as `\\n`, so that one event stays one line."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip("\n").replace("\n", "\\n")


def stream_is_journal(stream: IO[str] | None = None) -> bool:
    """True when `stream` (default stderr) is connected to journald (`JOURNAL_STREAM`)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    stream = sys.stderr if stream is None else stream
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (pytest capture)
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


def journal_prefix(levelno: int, stream: IO[str] | None = None) -> str:
    """`<N>` for a line printed to `stream` when it is the journal, else "" (for check-config)."""
    return f"<{syslog_priority(levelno)}>" if stream_is_journal(stream) else ""


class TextFormatter(logging.Formatter):
    """`TIME LEVEL logger: message` on one line; a bug's traceback folded onto it."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


class JournalFormatter(logging.Formatter):
    """`<N>logger: message` on one line: journald reads N as the priority and adds the time."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{one_line(super().format(record))}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, object] = {
            "ts": f"{when}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter_for(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Formatter:
    """The formatter of `log_format`; `auto` is `journal` under journald, else `text`."""
    if log_format == "auto":
        log_format = "journal" if stream_is_journal(stream) else "text"
    if log_format == "journal":
        return JournalFormatter()
    if log_format == "json":
        return JsonFormatter()
    return TextFormatter()


def configure_logging(level: int = logging.INFO, log_format: LogFormat = "auto") -> None:
    """Log to stderr, one line per record, in `log_format`; turn the libraries down.

    Calling it again replaces the handler it installed (and nothing else), so a command can
    configure logging early and again once it knows the format.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter_for(log_format, sys.stderr))
    root.addHandler(handler)
    root.setLevel(level)
    set_levels(LIBRARY_LEVELS)


def set_level(level: int) -> None:
    """Change the agent's own log level at run time (a reload); library levels stay as set."""
    logging.getLogger().setLevel(level)


def set_levels(levels: Mapping[str, int]) -> None:
    """Set each named logger to its level."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def quiet_unless_configured(library: str) -> None:
    """Set `library`'s logger to CRITICAL unless it has a level already (someone configured it)."""
    logger = logging.getLogger(library)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)
