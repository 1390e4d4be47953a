"""A --wrapper for bench/modbus_load.py: the agent's main-thread CPU time per task.

Run as the agent (`python -c <this file's code> run --config FILE`): every event-loop callback
is timed with `time.thread_time()` and added to its task's name (source tasks folded into one),
between SIGUSR1 and SIGUSR2, which modbus_load.py sends at the start and the end of its window.
The table goes to $TASK_CPU_OUT (default /tmp/task_cpu.txt). The timing itself costs a little
(two clock reads per callback), so the total is a few % above an uninstrumented run.

    .venv/bin/python bench/modbus_load.py --loads 200x100ms --wrapper bench/task_cpu.py
"""

import asyncio.events
import collections
import os
import re
import signal
import sys
import time
from typing import Any

import edge_agent.cli

spent: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()
window = {"on": False, "start": 0.0}
run_handle = asyncio.events.Handle._run


def task_name(handle: Any) -> str:
    owner = getattr(handle._callback, "__self__", None)
    if owner is not None and hasattr(owner, "get_coro"):
        coro = getattr(owner.get_coro(), "__qualname__", "?")
        return re.sub(r"\d+", "N", owner.get_name()) + ":" + coro
    return getattr(handle._callback, "__qualname__", repr(handle._callback))[:60]


def timed_run(handle: Any) -> None:
    if not window["on"]:
        run_handle(handle)
        return
    start = time.thread_time()
    try:
        run_handle(handle)
    finally:
        name = task_name(handle)
        spent[name] += time.thread_time() - start
        calls[name] += 1


def begin(*_: object) -> None:
    window["on"], window["start"] = True, time.thread_time()


def report(*_: object) -> None:
    total = time.thread_time() - window["start"]
    lines = [f"main thread {total:.3f} s, in callbacks {sum(spent.values()):.3f} s"]
    lines += [
        f"{name[:70]:70s} {seconds:7.3f} s {calls[name]:7d} calls "
        f"{1e6 * seconds / calls[name]:8.1f} us"
        for name, seconds in spent.most_common(30)
    ]
    with open(os.environ.get("TASK_CPU_OUT", "/tmp/task_cpu.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")


asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
signal.signal(signal.SIGUSR1, begin)
signal.signal(signal.SIGUSR2, report)
raise SystemExit(edge_agent.cli.main(sys.argv[1:]))
