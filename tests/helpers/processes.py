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


def _stat(pid: int | str) -> tuple[bytes, bytes, int] | None:
    """(comm, state, parent pid) of a process from /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            head, tail = stat.read().rsplit(b")", 1)
    except (OSError, ValueError):
        return None
    fields = tail.split()
    return head.split(b"(", 1)[1], fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, from each process's /proc/PID/stat (the `children`
    files of /proc miss children made concurrently, the kernel's documentation says)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        stat = _stat(entry) if entry.isdigit() else None
        if stat is not None and stat[2] == pid and stat[1] != b"Z":
            found.append(int(entry))
    return found


def forked_child(pid: int, timeout: float) -> int:
    """A child process of `pid` running its program (a fork, as the config reader of
    `edge-agent run` is, or a fresh interpreter of the same executable), polled from /proc: a
    separate process announces nothing. Seen on two polls in a row, so that a child of
    `subprocess` caught between its fork and its exec (ldconfig, run at import by ctypes) is not
    taken for one. TimeoutError when none appears within `timeout` s."""
    parent = _stat(pid)
    program = parent[0] if parent else b""
    end = time.monotonic() + timeout
    seen: set[int] = set()
    while time.monotonic() < end:
        now = {c for c in children(pid) if (_stat(c) or (b"",))[0] == program}
        if now & seen:
            return min(now & seen)
        seen = now
        time.sleep(0.002)  # polling another process's state: nothing to await
    raise TimeoutError(f"no forked child process of {pid} within {timeout:g}s")


ORPHAN_WATCH = """
import ctypes, os, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from helpers.processes import forked_child
ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans come here
agent = subprocess.Popen(sys.argv[2:], stderr=subprocess.DEVNULL)
child = forked_child(agent.pid, timeout=10)
os.kill(agent.pid, signal.SIGKILL)
agent.wait()
_, status = os.waitpid(child, 0)  # the orphan, re-parented to this process
print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))
"""
"""`python -c ORPHAN_WATCH TESTS_DIR COMMAND...`: runs COMMAND, SIGKILLs it once it has a
forked child, and prints how that child ended: the signal that killed it, or minus its exit
status. (A subreaper, so that the orphan can be waited for; Linux only.)"""
