"""Ending a child process the way an operator would: SIGTERM, a bounded wait, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess


def terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM `process` and wait at most `timeout` s for it; if it still runs, SIGKILL it and
    wait for that. Returns its exit status: negative for the signal that ended it (-9 when it
    had to be killed), so a caller that expects a clean stop asserts 0."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
