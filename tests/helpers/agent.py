"""The real `edge-agent run` process for the end-to-end tests, its configuration, strict JSON."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from edge_agent.demo.broker import Mosquitto
from helpers.ports import free_port

RELOAD_OUTCOMES = ("Reloaded", "Reload refused", "Reload failed")
"""The last line the agent logs for a SIGHUP (edge_agent/agent.py)."""


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


def random_source(points: int = 500, interval: str = "50ms") -> list[dict[str, Any]]:
    """A simulated source of `points` random points read every `interval` (at 50 ms, 20 x
    `points` readings/s: 10,000 by default) that compress like measurements."""
    return [
        {
            "type": "simulated",
            "name": "sim",
            "interval": interval,
            "points": [{"name": f"p{i}", "signal": "random"} for i in range(points)],
        }
    ]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as strict parsers do (RFC 8259): `NaN`, `Infinity`, `-Infinity` are errors."""
    return json.loads(text, parse_constant=_refuse_constant)


class AgentProcess:
    """The real `edge-agent run` process, started and stopped the way systemd would."""

    def __init__(
        self,
        config: dict[str, Any],
        directory: Path,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.path = directory / "agent.yaml"
        self.write_config(config)
        self.log_path = directory / "agent.log"
        self.health_url = f"http://{config['health']['listen']}"
        self.process: subprocess.Popen[bytes] | None = None
        self.args = args
        """Extra arguments of `edge-agent run` (e.g. `--log-format json`)."""
        self.env = env or {}
        """Extra environment for the process (e.g. `JOURNAL_STREAM`)."""

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Write the config file the agent reads (a dict as YAML, or text as it is)."""
        self.path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process and return at once (`start` also waits until it is ready)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(self.path), *self.args],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        return self.process

    def start(self, timeout: float = 20.0) -> None:
        """Start the process and wait (polling /readyz, at most `timeout` s) until it is ready."""
        self.spawn()
        assert self.process is not None
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
            time.sleep(0.05)  # a separate process: /readyz is the only signal it gives
        raise TimeoutError(f"agent not ready within {timeout:g}s:\n{self.log()}")

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

    def reload(self, timeout: float = 20.0) -> str:
        """Send SIGHUP and wait until the agent logs the outcome; return the log lines it added.

        The outcome is `Reloaded ...` or `Reload refused ...` (the agent's own log is the only
        signal a separate process gives).
        """
        assert self.process is not None
        before = self.log()
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            added = self.log()[len(before) :]
            for line in added.splitlines(keepends=True):
                if line.endswith("\n") and any(o in line for o in RELOAD_OUTCOMES):
                    return added
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited on reload:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"no reload outcome logged within {timeout:g}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
