"""Benchmark: check-config and start-up of large Modbus gateways, in blocks and point by point.

For each size (10,000 and 50,000 points by default) it writes one gateway of 1,000-point devices
twice: with blocks (`count`, ten 100-point entries per device, a mix of types and tables as a
register map lists them) and with every point written out on its own line (flow style, the
shortest form). Then, for each file:

- check-config: the real `python -m edge_agent check-config FILE` process; wall time, CPU time
  (user + system) and peak RSS of the process (wait4).
- start-up: the real `python -m edge_agent run` process, timed from launch to its "Started" log
  line, by which it has loaded the configuration and built every source (planning included);
  wall time, CPU time (with the child process that read the configuration) and RSS then
  (VmRSS) and peak (VmHWM, the agent's own) from /proc. The devices and the broker are absent
  (nothing listens on their ports): start-up does not wait for them.

A file over the size limit is reported as refused, with check-config's message. Wall times on a
shared machine vary with its load: the CPU times are the steadier figure.

    .venv/bin/python bench/config_load.py [--points 10000 50000] [--repeat 3]

Results and their reading: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

POINTS_PER_DEVICE = 1000
BLOCK = 100

# One device's map, as (name pattern, table, first address, type, extra keys): 10 blocks of 100.
DEVICE_MAP: list[tuple[str, str, int, str, dict[str, Any]]] = [
    ("ft{n:03}", "holding", 0, "float32", {"unit": "m3/h"}),
    ("pt{n:03}", "holding", 200, "float32", {"unit": "bar"}),
    ("hr{address}", "holding", 400, "uint16", {}),
    ("cnt{n:03}", "holding", 500, "uint32", {"word_order": "little"}),
    ("e{n:03}", "holding", 700, "float64", {}),
    ("tt{n:03}", "input", 0, "int16", {"scale": 0.1, "unit": "degC"}),
    ("lt{n:03}", "input", 100, "int16", {"scale": 0.01, "unit": "%"}),
    ("ai{address}", "input", 200, "uint16", {}),
    ("q{n:03}", "coil", 0, "bool", {}),
    ("di{n:03}", "discrete", 0, "bool", {}),
]
WIDTH = {"float32": 2, "uint32": 2, "float64": 4}


def block_entries() -> list[dict[str, Any]]:
    """One device's points as ten block entries."""
    return [
        {"name": name, "register": table, "address": address, "type": type_, "count": BLOCK,
         **extra}
        for name, table, address, type_, extra in DEVICE_MAP
    ]  # fmt: skip


def written_out() -> list[dict[str, Any]]:
    """The same points, one entry each (what the blocks expand to)."""
    points = []
    for name, table, address, type_, extra in DEVICE_MAP:
        for i in range(BLOCK):
            at = address + i * WIDTH.get(type_, 1)
            label = name.replace("{n:03}", f"{i + 1:03}").replace("{address}", str(at))
            points.append({"name": label, "register": table, "address": at, "type": type_,
                           **extra})  # fmt: skip
    return points


def write_config(path: Path, points: int, *, blocks: bool, key: Path, health: int) -> int:
    """A gateway of `points` points in 1,000-point devices; returns the file's size in bytes."""
    sources = [  # a fresh list per device: YAML would write a shared one as an alias
        {"type": "modbus", "name": f"plc{d:02}", "host": "127.0.0.1", "port": unused_port(),
         "points": block_entries() if blocks else written_out()}
        for d in range(points // POINTS_PER_DEVICE)
    ]  # fmt: skip
    config = {
        "gateway": {"id": "bench"},
        "store": {"path": str(path.parent / f"{path.stem}.db")},
        "mqtt": {"url": f"mqtt://127.0.0.1:{unused_port()}"},
        "signing": {"key_file": str(key)},
        "health": {"listen": f"127.0.0.1:{health}"},
        "sources": sources,
    }
    text = yaml.safe_dump(config, default_flow_style=None, sort_keys=False, width=200)
    path.write_text(text)
    return len(text.encode())


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_config(path: Path) -> dict[str, Any]:
    """One `check-config` process: exit status, wall and CPU seconds, peak RSS, last line."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "check-config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "ok": process.returncode == 0,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "message": output.strip().splitlines()[0] if output.strip() else "",
    }


def start_up(path: Path, log: Path, timeout: float = 120.0) -> dict[str, Any]:
    """One `run` process until its "Started" line: wall and CPU seconds, RSS now and peak."""
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(path)],
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        deadline = started + timeout
        while b" Started gateway=" not in log.read_bytes():
            if process.poll() is not None:
                raise RuntimeError(f"agent exited at start; see {log}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"agent did not start; see {log}")
            time.sleep(0.01)
        wall = time.perf_counter() - started
        ticks = os.sysconf("SC_CLK_TCK")
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime, stime, and cutime, cstime: the child that read the file (config/isolated.py)
        cpu = sum(int(f) for f in fields[11:15]) / ticks
        status = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
        )
        rss = int(status["VmRSS"].split()[0]) / 1024
        peak = int(status["VmHWM"].split()[0]) / 1024
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return {"wall": wall, "cpu": cpu, "rss_mb": rss, "peak_mb": peak}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the least CPU: the one least disturbed by other work on the machine."""
    return min(runs, key=lambda run: run["cpu"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is shown")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    print(f"{'points':>7} {'form':<10} {'file':>9} | {'check-config':^28} | {'start-up':^36}")
    print(f"{'':>7} {'':<10} {'KB':>9} | {'wall s':>8} {'CPU s':>8} {'peak MB':>9} |"
          f" {'wall s':>8} {'CPU s':>8} {'RSS MB':>8} {'peak MB':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="config-load-") as tmp:
        directory = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "edge_agent", "keygen", "--out", str(directory)],
            check=True, capture_output=True,
        )  # fmt: skip
        key = directory / "signing.key"
        for points in args.points:
            for blocks in (True, False):
                form = "blocks" if blocks else "one by one"
                path = directory / f"gw{points}-{'blocks' if blocks else 'points'}.yaml"
                size = write_config(path, points, blocks=blocks, key=key, health=unused_port())
                checks = [check_config(path) for _ in range(args.repeat)]
                check = best(checks)
                head = f"{points:>7} {form:<10} {size / 1024:>9.0f} |"
                if not check["ok"]:
                    print(f"{head} refused: {check['message']}")
                    continue
                run = best([
                    start_up(path, directory / f"{path.stem}.log") for _ in range(args.repeat)
                ])  # fmt: skip
                print(f"{head} {check['wall']:>8.2f} {check['cpu']:>8.2f} {check['rss_mb']:>9.0f} |"
                      f" {run['wall']:>8.2f} {run['cpu']:>8.2f} {run['rss_mb']:>8.0f}"
                      f" {run['peak_mb']:>8.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
