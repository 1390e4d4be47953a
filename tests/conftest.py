"""Shared fixtures (a private Mosquitto per test, a private PostgreSQL per session with a fresh
database per test, signing keys, the agents a test started) and the test layers: every test
carries exactly one layer marker, and a unit test stays in its process.

Helpers that are not fixtures live in tests/helpers/; tests/README.md describes the layers.
"""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ledger
from helpers.agent import AgentProcess
from helpers.postgres import PostgresServer

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.keys import write_keypair

LAYERS = ("unit", "integration", "e2e", "faults", "system")
"""The layer markers (registered in pyproject.toml); each test has exactly one."""

_DATABASES = itertools.count(1)
"""Numbers the per-test databases on the session's PostgreSQL (`postgres_dsn`)."""


def _layers(node: pytest.Item | pytest.Collector) -> list[str]:
    return sorted({mark.name for mark in node.iter_markers() if mark.name in LAYERS})


def _unlayered(nodes: list[Any]) -> list[str]:
    """`nodeid: markers` of each collected test without exactly one layer marker."""
    wrong = []
    for node in nodes:
        if isinstance(node, pytest.Item | pytest.Class):
            layers = _layers(node)
            if len(layers) != 1:
                wrong.append(f"{node.nodeid}: {', '.join(layers) or 'no layer marker'}")
    return wrong


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """A module with a test that has no layer marker (or two) fails to collect."""
    report = yield
    if isinstance(collector, pytest.Module) and report.passed:
        wrong = _unlayered(report.result)
        if wrong:
            report.outcome = "failed"
            report.longrepr = (
                f"each test needs exactly one layer marker ({', '.join(LAYERS)}), e.g. "
                "`pytestmark = pytest.mark.unit` in the module (tests/README.md):\n  "
                + "\n  ".join(wrong)
            )
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Backstop before `-m` deselects anything: no test runs without exactly one layer."""
    wrong = _unlayered(list(items))
    if wrong:
        raise pytest.UsageError(
            "each test needs exactly one layer marker (tests/README.md):\n  " + "\n  ".join(wrong)
        )


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request: pytest.FixtureRequest) -> Iterator[None]:
    """A unit test that starts a process, connects or listens fails, naming what it did."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(
                f"a unit test may not {what}: mark it integration (tests/README.md)"
            )

        return refused

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse("start a process"))
        patch.setattr(socket.socket, "connect", refuse("open a network connection"))
        patch.setattr(socket.socket, "connect_ex", refuse("open a network connection"))
        patch.setattr(socket.socket, "listen", refuse("run a server"))
        yield


_LEDGER_LINE = re.compile(r"^\s*ledger\b.*\blost\b", re.IGNORECASE)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Ledger lines a test printed without helpers/ledger.py (`ledger <case>: ... lost=...`),
    from its captured output, for the summary below; those it recorded are there already."""
    if report.when == "call":
        for line in report.capstdout.splitlines():
            if _LEDGER_LINE.match(line) and line.strip() not in ledger.LINES:
                ledger.LINES.append(line.strip())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Every fault case's ledger line (helpers/ledger.py), at the end, whatever the capture."""
    if ledger.LINES:
        terminalreporter.section("fault ledgers")
        for line in ledger.LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    directory = tmp_path / "broker"
    directory.mkdir()
    mosquitto = Mosquitto(directory=directory)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's own PostgreSQL (tests/helpers/postgres.py), started on first use.

    Shared by the tests of a session, each with its own database (`postgres_dsn`); a test that
    stops or crashes the server makes its own `PostgresServer` instead.
    """
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A libpq DSN to a new, empty database of this test's own on the session's server."""
    name = f"t{next(_DATABASES)}_{request.node.name}"
    return postgres_server.create_database("".join(c if c.isalnum() else "_" for c in name)[:60])


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    write_keypair(directory)
    return directory


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Collects started agents so that a failing test never leaves one running."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.process is not None:
            agent.process.kill()
            agent.process.wait()
