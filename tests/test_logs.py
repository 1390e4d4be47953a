"""Log formats (edge_agent/logs.py): journal lines with priorities and no timestamp, JSON for
shippers, one line per event whatever the message or traceback holds."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from edge_agent.logs import (
    JournalFormatter,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    formatter_for,
    journal_prefix,
    stream_is_journal,
)

pytestmark = pytest.mark.unit


def record(level: int, message: str, *, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("a bug\nover two lines")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("edge_agent.agent", level, __file__, 1, message, (), exc_info)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.CRITICAL, "<2>"),
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
    ],
)
def test_journal_lines_carry_the_priority_and_no_timestamp(level: int, prefix: str) -> None:
    line = JournalFormatter().format(record(level, "Started gateway=gw1 sources=2"))
    assert line == f"{prefix}edge_agent.agent: Started gateway=gw1 sources=2"


def test_a_multi_line_message_and_a_traceback_stay_one_line() -> None:
    """journald and shippers split on newlines: one event must never become several."""
    for formatter in (JournalFormatter(), TextFormatter()):
        line = formatter.format(record(logging.ERROR, "Source crashed\nsource=a", exc=True))
        assert "\n" not in line
        assert "Source crashed\\nsource=a" in line
        assert "RuntimeError: a bug\\nover two lines" in line
    entry = json.loads(JsonFormatter().format(record(logging.ERROR, "Crashed\nx", exc=True)))
    assert entry["message"] == "Crashed\nx"
    assert "RuntimeError: a bug" in entry["exception"]


def test_json_lines_are_objects_a_shipper_can_read() -> None:
    text = JsonFormatter().format(record(logging.WARNING, "Broker connection lost error=%s"))
    assert "\n" not in text
    entry = json.loads(text)
    assert entry["level"] == "warning"
    assert entry["logger"] == "edge_agent.agent"
    assert entry["message"] == "Broker connection lost error=%s"
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert "exception" not in entry


def test_journal_is_detected_from_journal_stream_naming_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd.exec(5): JOURNAL_STREAM is `device:inode` of the stream connected to journald."""
    with (tmp_path / "stderr").open("w") as stream, (tmp_path / "other").open("w") as other:
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert stream_is_journal(stream)
        assert isinstance(formatter_for("auto", stream), JournalFormatter)
        assert journal_prefix(logging.ERROR, stream) == "<3>"
        # Inherited by a child whose stderr went elsewhere: not the journal.
        assert not stream_is_journal(other)
        assert isinstance(formatter_for("auto", other), TextFormatter)
        assert journal_prefix(logging.ERROR, other) == ""
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stream_is_journal(io.StringIO())


def test_configure_logging_replaces_its_own_handler_only(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        configure_logging(log_format="json")
        configure_logging(log_format="journal")
        ours = [h for h in root.handlers if h.get_name() == "edge-agent"]
        assert len(ours) == 1 and foreign in root.handlers
        logging.getLogger("edge_agent.x").warning("Disk full: evicted oldest readings count=3")
        assert stream.getvalue() == "<4>edge_agent.x: Disk full: evicted oldest readings count=3\n"
    finally:
        root.removeHandler(foreign)
        for handler in [h for h in root.handlers if h.get_name() == "edge-agent"]:
            root.removeHandler(handler)
