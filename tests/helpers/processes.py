"""Ending a child process the way an operator would: SIGTERM, a bounded wait, then SIGKILL;
and the child processes a process has, as /proc shows them."""

from __future__ import annotations

import os
import signal
import subprocess
import time


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


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (of all its threads), from /proc; [] once it is gone."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as listing:
                found += [int(child) for child in listing.read().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return found


def first_child(pid: int, timeout: float) -> int:
    """The first child process `pid` starts, polled from /proc (a separate process announces
    nothing); TimeoutError when none appears within `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = children(pid)
        if found:
            return found[0]
        time.sleep(0.002)  # polling another process's state: nothing to await
    raise TimeoutError(f"no child process of {pid} within {timeout:g}s")
