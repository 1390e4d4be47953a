"""Shared fixtures: a private Mosquitto per test, signing keys, and the real agent process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.demo.broker import Mosquitto, free_port
from edge_agent.seal.keys import write_keypair


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    directory = tmp_path / "broker"
    directory.mkdir()
    mosquitto = Mosquitto(directory=directory)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    write_keypair(directory)
    return directory


def agent_config(
    tmp_path: Path, broker: Mosquitto, keys: Path, sources: list[dict[str, Any]], **overrides: Any
) -> dict[str, Any]:
    """A complete agent configuration for one test, as a dict (written by AgentProcess)."""
    config: dict[str, Any] = {
        "gateway": {"id": "test-gw"},
        "store": {"path": str(tmp_path / "buffer.db")},
        "mqtt": {
            "url": broker.url,
            "topic_prefix": "site/test",
            "reconnect_min": "200ms",
            "reconnect_max": "1s",
        },
        "batch": {"max_readings": 200, "max_delay": "200ms"},
        "signing": {"key_file": str(keys / "signing.key")},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        "sources": sources,
    }
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values}
    return config


class AgentProcess:
    """The real `edge-agent run` process, started and stopped the way systemd would."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        self.config = config
        self.path = directory / "agent.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "agent.log"
        self.health_url = f"http://{config['health']['listen']}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(self.path)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited at start:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.health_url}/readyz", timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready:\n{self.log()}")

    def status(self) -> dict[str, Any]:
        """/status, parsed as strict JSON (NaN or Infinity fail the test)."""
        with urllib.request.urlopen(f"{self.health_url}/status", timeout=5) as response:
            data: dict[str, Any] = strict_json(response.read())
            return data

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Collects started agents so that a failing test never leaves one running."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.process is not None:
            agent.process.kill()
            agent.process.wait()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as strict parsers do (RFC 8259): `NaN`, `Infinity`, `-Infinity` are errors."""
    return json.loads(text, parse_constant=_refuse_constant)


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll a cheap condition of a real process we cannot get an event from."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
