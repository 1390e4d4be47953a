"""The whole agent on real device loads: CPU, memory and delivered values of `edge-agent run`.

Four kinds of process, all real, measured from outside the agent:
- a device simulator in its own process: 10 Modbus TCP devices (pymodbus servers, one port
  each) whose holding registers change on every read, so that every value is new; and, for the
  OPC UA loads, an asyncua server (bench/opcua_subscribe.py's) that changes 1,000 variables
  every 100 ms;
- the agent: `python -m edge_agent run` with every register as a point (uint16 by default),
  read with FC3 in 100-register blocks (200 registers a device) or 125-register blocks (1,000);
- a private Mosquitto on a free port (edge_agent.demo.broker);
- a consumer (bench/pipeline.py's: paho, MQTT 5, QoS 1) that opens every batch with the real
  Opener (signature checked) and checks completeness by `seq`.

Per load: the agent is started on a fresh buffer, warms up, then over a steady window of whole
poll intervals the benchmark reads the agent's CPU (utime + stime of all its threads from
/proc/PID/stat) as % of one core, its RSS at the end of the window (VmRSS) and its peak (VmHWM,
start-up included), and counts the values delivered: readings stamped in the window that the
consumer received, verified, with no hole in `seq`.

    .venv/bin/python bench/modbus_load.py                  # all five loads, about 3 minutes
    .venv/bin/python bench/modbus_load.py --loads 200x100ms --window 20
    .venv/bin/python bench/modbus_load.py --profile DIR    # py-spy over each window (raw stacks)

Results and their reading: docs/performance.md ("Real device loads").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from pipeline import CLK_TCK, GATEWAY, TOPIC_PREFIX, AgentProcess, Consumer  # noqa: E402

from edge_agent.demo.broker import Mosquitto, free_port  # noqa: E402
from edge_agent.seal.keys import write_keypair  # noqa: E402

OPCUA_PERIOD = 0.1
NODE_RED = {"200x1s": (2.2, "109-127"), "200x100ms": (13.0, "162"), "1000x1s": (4.2, "145")}
"""Node-RED + node-red-contrib-modbus on the same loads (issue 10): CPU % of a core, RSS MB."""


@dataclass(frozen=True)
class Load:
    """One gateway: Modbus devices x registers polled every `interval`, and/or OPC UA items."""

    name: str
    devices: int = 0
    registers: int = 0
    interval: float = 1.0
    block: int = 125
    opcua_items: int = 0

    @property
    def expected_per_s(self) -> float:
        modbus = self.devices * self.registers / self.interval if self.devices else 0.0
        return modbus + self.opcua_items / OPCUA_PERIOD

    @property
    def points(self) -> int:
        return self.devices * self.registers + self.opcua_items


LOADS = {
    "200x1s": Load("200x1s", devices=10, registers=200, interval=1.0, block=100),
    "200x100ms": Load("200x100ms", devices=10, registers=200, interval=0.1, block=100),
    "1000x1s": Load("1000x1s", devices=10, registers=1000, interval=1.0, block=125),
    "opcua": Load("opcua", opcua_items=1000),
    "mixed": Load("mixed", devices=10, registers=200, interval=1.0, block=100, opcua_items=1000),
}
"""The loads of issue 10 (10 devices each), the OPC UA load and the mixed gateway."""


# --------------------------------------------------------------------------- device simulator


async def serve_modbus(devices: int, registers: int) -> None:
    """The simulator process: `devices` pymodbus TCP servers; prints their ports as JSON.

    Every read rewrites the registers it covers with values that differ from the last read's,
    so that no reading repeats the previous one.
    """
    from pymodbus.server import ModbusTcpServer  # noqa: PLC0415 - the simulator process only
    from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: PLC0415

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # clients leaving at the end
    reads = [0] * devices

    async def changing(
        device: int,
        function_code: int,
        start: int,
        address: int,
        count: int,
        current: list[int],
        values: object,
    ) -> None:
        reads[device] += 1
        base = reads[device] * 7919
        for offset in range(address - start, address - start + count):
            current[offset] = (base + offset * 31) & 0xFFFF

    ports = []
    for index in range(devices):
        device = SimDevice(
            id=1,
            simdata=[SimData(0, values=[0] * registers, datatype=DataType.REGISTERS)],
            action=functools.partial(changing, index),
        )
        server = ModbusTcpServer([device], address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        ports.append(server.transport.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


class Simulators:
    """The device processes of one load; stopped by `close`."""

    def __init__(self, load: Load, rounds: int) -> None:
        self.ports: list[int] = []
        self.opcua_port = 0
        self._procs: list[subprocess.Popen[str]] = []
        if load.devices:
            proc = self._spawn(
                [str(BENCH / "modbus_load.py"), "--serve-modbus", f"{load.devices}",
                 f"{load.registers}"]
            )  # fmt: skip
            assert proc.stdout is not None
            self.ports = json.loads(proc.stdout.readline())
        if load.opcua_items:
            self.opcua_port = free_port()
            self.progress = Path(tempfile.mkdtemp(prefix="bench-opcua-")) / "published"
            self._opcua = self._spawn(
                [str(BENCH / "opcua_subscribe.py"), "--serve", str(self.opcua_port),
                 "--items", str(load.opcua_items), "--rounds", str(rounds),
                 "--period", str(OPCUA_PERIOD)],
                stdin=subprocess.PIPE,
                env={**os.environ, "BENCH_PROGRESS_FILE": str(self.progress)},
            )  # fmt: skip
            assert self._opcua.stdout is not None
            if not self._opcua.stdout.readline().startswith("READY"):
                raise RuntimeError("the OPC UA server did not start")

    def _spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        command = [sys.executable, *args]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **kwargs)
        self._procs.append(proc)
        return proc

    def published(self) -> int:
        """OPC UA value changes the server has written so far (at the last round's start)."""
        if not self.opcua_port:
            return 0
        with contextlib.suppress(OSError, ValueError):
            return int(self.progress.read_text())
        return 0

    def start_changing(self) -> None:
        """OPC UA: start the rounds of changes (the Modbus devices change on every read)."""
        if self.opcua_port:
            assert self._opcua.stdin is not None
            self._opcua.stdin.write("GO\n")
            self._opcua.stdin.flush()

    def close(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- the agent's config


def modbus_sources(load: Load, ports: list[int], point_type: str) -> list[dict[str, Any]]:
    width = {"uint16": 1, "int16": 1, "float32": 2, "uint32": 2, "int32": 2}[point_type]
    points = [
        {"name": f"r{a}", "register": "holding", "address": a, "type": point_type}
        for a in range(0, load.registers - width + 1, width)
    ]
    return [
        {
            "type": "modbus",
            "name": f"dev{i}",
            "host": "127.0.0.1",
            "port": port,
            "poll_interval": load.interval,
            "timeout": "1s",
            "max_registers_per_read": load.block,
            "points": [dict(p) for p in points],  # not shared: YAML aliases are refused
        }
        for i, port in enumerate(ports)
    ]


def opcua_source(load: Load, port: int) -> dict[str, Any]:
    period = f"{round(OPCUA_PERIOD * 1000)}ms"
    return {
        "type": "opcua",
        "name": "opcua",
        "endpoint": f"opc.tcp://127.0.0.1:{port}/bench/",
        "security": {"policy": "None"},
        "interval": period,
        "sampling_interval": period,
        "nodes": [{"name": f"v{i}", "node_id": f"ns=2;s=v{i}"} for i in range(load.opcua_items)],
    }


def agent_config(
    load: Load, sims: Simulators, directory: Path, broker: Mosquitto, point_type: str
) -> dict[str, Any]:
    sources = modbus_sources(load, sims.ports, point_type) if load.devices else []
    if load.opcua_items:
        sources.append(opcua_source(load, sims.opcua_port))
    return {
        "gateway": {"id": GATEWAY},
        "store": {"path": str(directory / "buffer.db"), "max_bytes": "1GiB"},
        "mqtt": {"url": broker.url, "topic_prefix": TOPIC_PREFIX},
        "signing": {"key_file": str(directory.parent / "keys" / "signing.key")},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        "sources": sources,
    }


# --------------------------------------------------------------------------- measuring


def byte_compile() -> None:
    """The agent's own modules byte-compiled (`__pycache__`, as pip does when it installs).

    An installed agent loads bytecode; one run from a source tree under PYTHONDONTWRITEBYTECODE
    compiles every module of edge_agent at each start, and the compiler's memory stays in the
    process (about 2.5 MB of RSS): that is not what a gateway runs.
    """
    package = Path(__import__("edge_agent").__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


CPROFILE_WRAPPER = """
import cProfile, signal, sys
import edge_agent.cli
profiler = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
signal.signal(signal.SIGUSR2, lambda *_: (profiler.disable(), profiler.dump_stats({path!r})))
raise SystemExit(edge_agent.cli.main(sys.argv[1:]))
"""
"""--cprofile: the agent's main thread profiled over the window only (SIGUSR1 to SIGUSR2)."""


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of all the threads of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime (fields 14, 15)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process, by thread id and name (/proc/PID/task/TID/stat)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            text = (task / "stat").read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            label = "main" if task.name == str(pid) else name
            found[f"{task.name} {label}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def status(agent: AgentProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{agent.url}/status", timeout=10) as response:
        return dict(json.loads(response.read()))


def profile(args: argparse.Namespace, pid: int, name: str, seconds: float) -> Any:
    """py-spy over the window, as raw collapsed stacks (flamegraph.pl input)."""
    if not args.profile:
        return None
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid),
               "-d", str(math.ceil(seconds)), "-r", "100", "-f", "raw",
               "-o", str(out / f"{name}.txt")]  # fmt: skip
    if args.native:
        command.append("--native")
    else:
        command.append("--nonblocking")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(
    load: Load, args: argparse.Namespace, work: Path, broker: Mosquitto, consumer: Consumer
) -> dict[str, Any]:
    directory = work / load.name
    directory.mkdir()
    window = args.window
    if load.devices:  # whole poll intervals: every poll counts once
        window = max(1, round(window / load.interval)) * load.interval
    rounds = math.ceil((args.warmup + window + 30) / OPCUA_PERIOD)
    sims = Simulators(load, rounds)
    try:
        config = agent_config(load, sims, directory, broker, args.type)
        wrapper = Path(args.wrapper).read_text() if args.wrapper else ""
        if args.cprofile:
            Path(args.cprofile).mkdir(parents=True, exist_ok=True)
            stats = Path(args.cprofile).resolve() / f"{load.name}.pstats"
            wrapper = CPROFILE_WRAPPER.format(path=str(stats))
        agent = AgentProcess(directory, config, "agent", wrapper=wrapper)
        consumer.call("take")  # forget anything left over
        agent.start()
        sims.start_changing()
        # The polls are due at whole intervals from the agent's start: the window starts half an
        # interval off them, so that no poll sits on its edge (and counts or not by jitter).
        time.sleep(args.warmup + (load.interval / 2 if load.devices else 0.0))
        pid = agent.pid
        before = status(agent)
        threads0 = thread_cpu_s(pid)
        published0 = sims.published()
        cpu0, wall0, t0_ns = cpu_s(pid), time.monotonic(), time.time_ns()
        profiler = profile(args, pid, load.name, window)
        if args.cprofile or args.wrapper:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(window)
        if args.cprofile or args.wrapper:
            os.kill(pid, signal.SIGUSR2)
        cpu1, wall1 = cpu_s(pid), time.monotonic()
        threads1 = thread_cpu_s(pid)
        published1 = sims.published()
        rss_end, rss_peak = rss_mb(pid)
        after = status(agent)
        if profiler is not None:
            profiler.wait()
        code = agent.stop()
        consumer.settle()
        seen = consumer.call("take", {"window": (t0_ns, t0_ns + round(window * 1e9))})
    finally:
        sims.close()
    errors = sum(s["errors"] for s in after["sources"].values()) - sum(
        s["errors"] for s in before["sources"].values()
    )
    delivered = seen["latency_samples"] / window
    requests = sum(s["counts"].get("requests", 0) for s in after["sources"].values()) - sum(
        s["counts"].get("requests", 0) for s in before["sources"].values()
    )
    return {
        "load": load.name,
        "points": load.points,
        "expected_per_s": load.expected_per_s,
        "window_s": window,
        "cpu_pct": 100 * (sum(cpu1) - sum(cpu0)) / (wall1 - wall0),
        "system_pct": 100 * (cpu1[1] - cpu0[1]) / (wall1 - wall0),
        "thread_cpu_pct": {
            name: round(100 * (spent - threads0.get(name, 0.0)) / (wall1 - wall0), 2)
            for name, spent in threads1.items()
        },
        "rss_end_mb": rss_end,
        "rss_peak_mb": rss_peak,
        "delivered_per_s": delivered,
        "opcua_published_per_s": (published1 - published0) / (wall1 - wall0),
        "modbus_requests_per_s": requests / (wall1 - wall0),
        "modbus_requests_expected_per_s": load.devices
        * math.ceil(load.registers / load.block)
        / load.interval,
        "bad_in_window": seen["bad"],
        "source_errors": errors,
        "holes": seen["holes"],
        "p50_ms": seen["p50_ms"],
        "p99_ms": seen["p99_ms"],
        "exit_code": code,
        "complete": seen["holes"] == 0 and code == 0 and errors == 0 and seen["bad"] == 0,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print()
    header = (
        f"{'load':<10} {'points':>7} {'expected/s':>10} {'delivered/s':>11} {'CPU %':>6} "
        f"{'RSS end':>7} {'RSS peak':>8} {'p99 ms':>7} {'holes':>5} {'errors':>6}  Node-RED CPU/RSS"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        node_red = NODE_RED.get(r["load"])
        peer = f"{node_red[0]:.1f} % / {node_red[1]} MB" if node_red else "-"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.0f}"
        print(
            f"{r['load']:<10} {r['points']:>7,} {r['expected_per_s']:>10,.0f} "
            f"{r['delivered_per_s']:>11,.0f} {r['cpu_pct']:>6.2f} {r['rss_end_mb']:>7.1f} "
            f"{r['rss_peak_mb']:>8.1f} {p99:>7} {r['holes']:>5} {r['source_errors']:>6}  {peer}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}"
    )
    parser.add_argument("--window", type=float, default=20.0, help="measurement window, seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--type", default="uint16", choices=("uint16", "int16", "float32", "uint32", "int32"),
        help="the type of every Modbus point (one per register for 16-bit types)",
    )  # fmt: skip
    parser.add_argument("--profile", metavar="DIR", help="py-spy each window into DIR")
    parser.add_argument("--native", action="store_true", help="with --profile: native frames")
    parser.add_argument(
        "--cprofile", metavar="DIR", help="cProfile the agent's main thread over each window"
    )
    parser.add_argument(
        "--wrapper", metavar="FILE", help="experiment: run the agent with this Python file's code "
        "instead of `-m edge_agent` (it reads sys.argv[1:])",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--dir", help="work directory, kept (default: a temporary one, removed)")
    parser.add_argument(
        "--no-bytecode", action="store_true",
        help="do not byte-compile edge_agent first: with PYTHONDONTWRITEBYTECODE set, the agent "
        "then compiles its modules at every start (about 2.5 MB more RSS)",
    )  # fmt: skip
    parser.add_argument("--serve-modbus", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_modbus:
        asyncio.run(serve_modbus(*args.serve_modbus))
        return 0
    loads = [LOADS[name] for name in args.loads.split(",")]
    results = []
    with contextlib.ExitStack() as stack:
        if args.dir:
            work = Path(args.dir)
            work.mkdir(parents=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-load-")))
        if not args.no_bytecode:
            byte_compile()
        write_keypair(work / "keys")
        (work / "broker").mkdir()
        broker = stack.enter_context(Mosquitto(directory=work / "broker"))
        consumer = Consumer(broker.port, work / "keys" / "signing.pub")
        stack.callback(consumer.close)
        if not consumer.call("connected", 10.0):
            raise RuntimeError("consumer could not connect to the broker")
        for load in loads:
            result = measure(load, args, work, broker, consumer)
            results.append(result)
            print(
                f"  {load.name}: CPU {result['cpu_pct']:.2f} % of a core, RSS "
                f"{result['rss_end_mb']:.1f} MB (peak {result['rss_peak_mb']:.1f}), delivered "
                f"{result['delivered_per_s']:,.0f}/s of {load.expected_per_s:,.0f}/s"
                + ("" if result["complete"] else " INCOMPLETE"),
                flush=True,
            )
            threads = ", ".join(f"{k.split()[1]} {v:.2f}" for k, v in
                                result["thread_cpu_pct"].items() if v)  # fmt: skip
            print(
                f"    system {result['system_pct']:.2f} %; threads: {threads}; Modbus requests "
                f"{result['modbus_requests_per_s']:.1f}/s of "
                f"{result['modbus_requests_expected_per_s']:.1f}/s"
                + (
                    f"; OPC UA server wrote {result['opcua_published_per_s']:,.0f} changes/s"
                    if load.opcua_items
                    else ""
                ),
                flush=True,
            )
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["complete"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
