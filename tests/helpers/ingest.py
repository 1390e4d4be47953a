"""The real `edge-agent ingest` processes for the tests: a worker, and the short commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.processes import terminate

READY_LINE = "Ingest subscribed"
"""What a worker logs once its shared subscription is in place (worker.py)."""


def ingest(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `edge-agent ingest ARGS...` to its end; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "ingest", *args],
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip


class IngestWorker:
    """One `edge-agent ingest run` process, with its log in `directory/NAME.log`."""

    def __init__(self, directory: Path, *args: str, name: str = "ingest") -> None:
        self.args = args
        self.log_path = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start the worker and wait until it logs its subscription (its only signal)."""
        log = self.log_path.open("ab")
        offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "ingest", "run", *self.args],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if READY_LINE in self.log()[offset:]:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"ingest exited at start:\n{self.log()}")
            time.sleep(0.05)  # a separate process: its log is the only signal it gives
        raise TimeoutError(f"ingest not subscribed within {timeout:g}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (SIGKILL for a crash) and wait; the exit status."""
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def log(self) -> str:
        """Everything the worker wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> IngestWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            terminate(self.process, 15)
            self.process = None
