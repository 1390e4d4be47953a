"""End-to-end benchmark of the real pipeline: `edge-agent run` -> private Mosquitto -> consumer.

Three processes, all real: the agent (`python -m edge_agent run`, a simulated source offering a
fixed rate), a private Mosquitto on a free port (edge_agent.demo.broker), and a consumer (paho,
MQTT 5, persistent session) that timestamps every batch on receipt and, after each phase, opens
every batch with the real Opener (signature checked) and checks completeness by `seq`.

Phases
  sustained  for each offered rate (points x 1/interval): a fresh buffer, warm-up, then a window in
             which the rate counts as sustained only if the source produced >= 98% of the
             offered readings (less one tick, the counters' granularity), the buffer grew by at
             most half a second's worth and ended below one second's worth (so the broker
             acknowledged as much as was produced), and the consumer saw no hole.
  drain      the broker is stopped; an agent seals >= 1,000,000 readings into its buffer and is
             stopped; the broker comes back and a new agent on the same buffer ships the backlog
             while offering --drain-live readings/s (default: 1/s, then 100,000/s). Timed from
             that agent's "Connected to broker" log line to the consumer's receipt of the last
             backlog batch.

Measured from outside the agent: CPU (utime+stime of all its threads, /proc/PID/stat), peak RSS
(VmHWM, /proc/PID/status), its counters (/status, /metrics). Latency is reading `ts` (stamped by
the source) -> the consumer's receipt of the batch, which is an upper bound of reading -> PUBACK
(the broker sends the PUBACK before or while it forwards the message to the subscriber).

    .venv/bin/python bench/pipeline.py            # full run, ~2.5 minutes
    .venv/bin/python bench/pipeline.py --quick    # ~25 s smoke run

Results and their reading: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.consumer.completeness import Completeness
from edge_agent.demo.broker import Mosquitto, free_port
from edge_agent.seal.envelope import Opener
from edge_agent.seal.keys import load_public_key, write_keypair

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' helpers
from helpers.processes import terminate

TOPIC_PREFIX = "bench"
GATEWAY = "bench-gw"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUSTAIN_FRACTION = 0.98


GC_WRAPPER = """
import gc, sys
import edge_agent.agent, edge_agent.cli  # what `edge-agent run` imports anyway
gc.freeze()  # the objects of the imports: never garbage, no need to traverse them again
gc.set_threshold({threshold}, 10, 10)
raise SystemExit(edge_agent.cli.main(sys.argv[1:]))
"""
"""--gc-threshold: the experiment of docs/performance.md, the agent with a tuned collector."""


# --------------------------------------------------------------------------- consumer process


def consumer_main(port: int, key_path: str, conn: Any) -> None:
    """Receive batches (timestamp and bytes only, off the critical path); analyse on demand."""
    opener = Opener([load_public_key(Path(key_path))])
    received: list[tuple[int, bytes]] = []
    connected = threading.Event()

    def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        client.subscribe(f"{TOPIC_PREFIX}/{GATEWAY}/batch", qos=1)
        connected.set()

    def on_disconnect(*_args: Any) -> None:
        connected.clear()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        received.append((time.time_ns(), message.payload))

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="bench-consumer", protocol=mqtt.MQTTv5
    )
    client.on_connect, client.on_disconnect, client.on_message = (
        on_connect,
        on_disconnect,
        on_message,
    )
    client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)
    client.max_inflight_messages_set(0)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.loop_start()

    while True:
        command, arg = conn.recv()
        if command == "quit":
            client.loop_stop()
            client.disconnect()
            conn.send(None)
            return
        if command == "connected":
            conn.send(connected.wait(arg))
        elif command == "count":
            conn.send(len(received))
        elif command == "take":
            taken, received[:] = received[:], []
            conn.send(analyse(opener, Completeness(), taken, arg))


def analyse(
    opener: Any, tracker: Any, taken: list[tuple[int, bytes]], options: dict[str, Any] | None
) -> dict[str, Any]:
    """Open and check every batch.

    options: `window` (lo_ns, hi_ns): latencies of the readings whose ts lies in it;
    `upto_seq`: first/last receipt only of batches wholly at or below that seq (a backlog);
    `also` (lo_ns, hi_ns): a second window, whose latencies give `also_p50_ms`, `also_p99_ms`.
    """
    options = options or {}
    window, upto, also = options.get("window"), options.get("upto_seq"), options.get("also")
    latencies, sealing, also_latencies = array("q"), array("q"), array("q")
    readings = fresh = bad = 0
    first_recv = last_recv = 0
    first_any = taken[0][0] if taken else 0
    for recv_ns, payload in taken:
        batch = opener.open(payload)  # raises on a bad signature: the benchmark must not hide it
        got = tracker.accept(batch.gateway, batch.epoch, batch.readings, batch.evicted)
        readings += len(batch.readings)
        fresh += len(got)
        if batch.readings and (upto is None or batch.readings[-1]["seq"] <= upto):
            first_recv = first_recv or recv_ns
            last_recv = recv_ns
        if window is not None:
            lo, hi = window
            in_window = [r for r in got if lo <= r["ts"] < hi]
            latencies.extend(recv_ns - r["ts"] for r in in_window)
            bad += sum(r["q"] != "good" for r in in_window)
            if in_window and batch.sealed_ns >= lo:  # sealed -> received, per reading
                sealing.extend([recv_ns - batch.sealed_ns] * len(in_window))
        if also is not None:
            also_latencies.extend(recv_ns - r["ts"] for r in got if also[0] <= r["ts"] < also[1])
    holes = sum(len(s.holes()) for s in tracker.streams.values())
    ordered, from_seal, also_ordered = sorted(latencies), sorted(sealing), sorted(also_latencies)

    def pct(p: float, values: list[int] = ordered) -> float | None:
        return values[min(len(values) - 1, int(p * len(values)))] / 1e6 if values else None

    return {
        "batches": len(taken),
        "readings": readings,
        "unique": fresh,
        "holes": holes,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        "sealed_p50_ms": pct(0.50, from_seal),
        "sealed_p99_ms": pct(0.99, from_seal),
        "also_p50_ms": pct(0.50, also_ordered),
        "also_p99_ms": pct(0.99, also_ordered),
        "latency_samples": len(ordered),
        "bad": bad,
        "first_recv_ns": first_recv,
        "last_recv_ns": last_recv,
        "first_any_ns": first_any,
    }


class Consumer:
    def __init__(self, port: int, key_path: Path) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=consumer_main,
            args=(port, str(key_path), child),
            name="bench-consumer",
            daemon=True,
        )
        self.process.start()

    def call(self, command: str, arg: Any = None) -> Any:
        self._conn.send((command, arg))
        return self._conn.recv()

    def settle(self, quiet: float = 1.0, timeout: float = 60.0) -> None:
        """Wait until no batch has arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = self.call("count")
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("quit")
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


# --------------------------------------------------------------------------- agent process


@dataclass
class Sample:
    t: float
    produced: int
    sealed: float
    sent: float
    buffered: int
    cpu_s: float
    connected: bool


@dataclass
class AgentProcess:
    directory: Path
    config: dict[str, Any]
    name: str
    gc_threshold: int = 0
    wrapper: str = ""
    """Python code to run the agent with instead of `-m edge_agent` (it reads sys.argv[1:])."""
    process: subprocess.Popen[bytes] | None = None
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://{self.config['health']['listen']}"
        self.config_path = self.directory / f"{self.name}.yaml"
        # Flow style for the points: a config file may not exceed 4 MiB.
        self.config_path.write_text(yaml.safe_dump(self.config, default_flow_style=None))
        self.log_path = self.directory / f"{self.name}.log"

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        command = [sys.executable, "-m", "edge_agent"]
        if self.gc_threshold:
            command = [sys.executable, "-c", GC_WRAPPER.format(threshold=self.gc_threshold)]
        if self.wrapper:
            command = [sys.executable, "-c", self.wrapper]
        self.process = subprocess.Popen(
            [*command, "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited at start; see {self.log_path}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready; see {self.log_path}")

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return bytes(response.read())

    def sample(self) -> Sample:
        status = json.loads(self._get("/status"))
        metrics: dict[str, float] = {}
        for line in self._get("/metrics").decode().splitlines():
            if line.startswith("edge_agent_readings_"):
                name, value = line.rsplit(" ", 1)
                metrics[name] = float(value)
        return Sample(
            t=time.monotonic(),
            produced=sum(s["readings"] for s in status["sources"].values()),
            sealed=metrics.get("edge_agent_readings_sealed_total", 0.0),
            sent=metrics.get("edge_agent_readings_sent_total", 0.0),
            buffered=status["buffer"]["readings"],
            cpu_s=self.cpu_s(),
            connected=status["mqtt"]["connected"],
        )

    def buffered(self) -> tuple[int, bool]:
        status = json.loads(self._get("/status"))
        return status["buffer"]["readings"], status["mqtt"]["connected"]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, at most `timeout` s for a clean stop, then SIGKILL; the exit status."""
        assert self.process is not None
        code = terminate(self.process, timeout)
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.directory = directory
        self.keys = directory / "keys"
        write_keypair(self.keys)
        self.broker = Mosquitto(directory=self._mkdir("broker"))
        self.broker.start()
        self.consumer = Consumer(self.broker.port, self.keys / "signing.pub")
        if not self.consumer.call("connected", 10.0):
            raise RuntimeError("consumer could not connect to the broker")
        self.agents: list[AgentProcess] = []

    def _mkdir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def agent(self, name: str, store: Path, points: int, interval: float) -> AgentProcess:
        config = {
            "gateway": {"id": GATEWAY},
            "store": {"path": str(store), "max_bytes": "4GiB"},
            "mqtt": {
                "url": self.broker.url,
                "topic_prefix": TOPIC_PREFIX,
                "max_inflight": self.args.inflight,
                "reconnect_min": "100ms",
                "reconnect_max": "200ms",
            },
            "batch": {
                "max_readings": self.args.batch,
                "max_delay": "1s",
                "format": self.args.format,
            },
            "signing": {"key_file": str(self.keys / "signing.key")},
            "health": {"listen": f"127.0.0.1:{free_port()}"},
            "sources": [
                {
                    "type": "simulated",
                    "name": "sim",
                    "interval": interval,
                    "points": point_list(points, self.args.signals),
                }
            ],
        }
        agent = AgentProcess(self.directory, config, name, gc_threshold=self.args.gc_threshold)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        self.consumer.close()
        self.broker.stop()

    def profile(self, agent: AgentProcess, name: str) -> subprocess.Popen[bytes] | None:
        """py-spy over the measurement window, as collapsed stacks (flamegraph.pl input)."""
        if not self.args.profile:
            return None
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        py_spy = Path(sys.executable).with_name("py-spy")
        return subprocess.Popen(
            [
                str(py_spy),
                "record",
                "-p",
                str(agent.pid),
                "-d",
                str(int(self.args.window)),
                "-r",
                "200",
                "--nonblocking",
                "-f",
                "raw",
                "-o",
                str(out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    # ----------------------------------------------------------------- sustained

    def sustained(self, rate: int) -> dict[str, Any]:
        interval = self.args.interval
        points = round(rate * interval)
        store = self._mkdir(f"sustained-{rate}") / "buffer.db"
        agent = self.agent(f"agent-{rate}", store, points, interval)
        self.consumer.call("take")  # forget anything left over
        agent.start()
        time.sleep(self.args.warmup)
        s0 = agent.sample()
        t0_ns = time.time_ns()
        profiler = self.profile(agent, f"sustained-{rate}")
        time.sleep(self.args.window)
        s1 = agent.sample()
        if profiler is not None:
            profiler.wait()
        t1_ns = time.time_ns()
        rss = agent.peak_rss_mb()
        code = agent.stop()
        self.consumer.settle()
        seen = self.consumer.call("take", {"window": (t0_ns, t1_ns)})
        elapsed = s1.t - s0.t
        produced = (s1.produced - s0.produced) / elapsed
        sent = (s1.sent - s0.sent) / elapsed
        sealed = (s1.sealed - s0.sealed) / elapsed
        growth = s1.buffered - s0.buffered
        # The counters move a tick (`points` readings) at a time: allow one tick of sampling
        # slack. Acknowledged = produced - growth, so these two checks cover forwarding too.
        ok = (
            produced >= SUSTAIN_FRACTION * rate - points / elapsed
            and growth <= rate * 0.5
            and s1.buffered <= rate
            and seen["holes"] == 0
            and code == 0
        )
        cpu = s1.cpu_s - s0.cpu_s
        return {
            "offered": rate,
            "points": points,
            "interval_s": interval,
            "produced_per_s": produced,
            "sealed_per_s": sealed,
            "acked_per_s": sent,
            "buffer_start": s0.buffered,
            "buffer_end": s1.buffered,
            "cpu_s_per_100k": cpu / max(s1.sealed - s0.sealed, 1) * 1e5,
            "cpu_util": cpu / elapsed,
            "peak_rss_mb": rss,
            "exit_code": code,
            "consumer": seen,
            "sustained": ok,
        }

    # ----------------------------------------------------------------- drain

    def drain(self, target: int, live_rate: int) -> dict[str, Any]:
        """Seal `target` readings with the broker down, then time shipping them after a restart.

        The restarted agent offers `live_rate` readings/s meanwhile (0: one reading a second).
        """
        store = self._mkdir(f"drain-{live_rate}") / "buffer.db"
        interval = self.args.interval
        fill_rate = self.args.fill_rate
        self.broker.stop()
        filler = self.agent(f"agent-fill-{live_rate}", store, round(fill_rate * interval), interval)
        filler.start()
        began = time.monotonic()
        while True:
            buffered, _ = filler.buffered()
            if buffered >= target:
                break
            if time.monotonic() - began > 120:
                raise TimeoutError(f"buffer reached only {buffered} readings")
            time.sleep(0.2)
        fill_elapsed = time.monotonic() - began
        fill_rss = filler.peak_rss_mb()
        filler.stop()
        with contextlib.closing(sqlite3.connect(store)) as db:
            backlog, batches, last_seq = db.execute(
                "SELECT coalesce(sum(readings), 0), count(*), max(last_seq) FROM batches"
            ).fetchone()
        self.broker.start()
        if not self.consumer.call("connected", 10.0):
            raise RuntimeError("consumer did not reconnect")
        self.consumer.call("take")
        if live_rate:
            drainer = self.agent(
                f"agent-drain-{live_rate}", store, round(live_rate * interval), interval
            )
        else:
            drainer = self.agent("agent-drain-0", store, 1, 1.0)
        drainer.start()
        cpu_start = drainer.cpu_s()
        polled_at = None
        while True:
            buffered, connected = drainer.buffered()
            now = time.monotonic()
            if connected and polled_at is None:
                polled_at = now
            if polled_at is not None and buffered <= max(live_rate, 10):
                break
            if polled_at is not None and now - polled_at > 120:
                raise TimeoutError(f"drain stalled with {buffered} readings buffered")
            time.sleep(0.05)
        cpu = drainer.cpu_s() - cpu_start
        rss = drainer.peak_rss_mb()
        code = drainer.stop()
        self.consumer.settle()
        seen = self.consumer.call("take", {"upto_seq": last_seq})
        connected_ns = connect_time_ns(drainer.log_path)
        # From the agent's broker connection (its log, ms) to the consumer's receipt of the last
        # backlog batch: the broker sent that batch's PUBACK at the same moment, give or take.
        drain_elapsed = (seen["last_recv_ns"] - connected_ns) / 1e9
        consumer_elapsed = (seen["last_recv_ns"] - seen["first_recv_ns"]) / 1e9
        return {
            "live_rate": live_rate,
            "backlog_readings": backlog,
            "backlog_batches": batches,
            "fill_rate": fill_rate,
            "fill_seconds": fill_elapsed,
            "fill_peak_rss_mb": fill_rss,
            "drain_seconds": drain_elapsed,
            "drain_per_s": backlog / drain_elapsed,
            "consumer_seconds": consumer_elapsed,
            "consumer_per_s": backlog / consumer_elapsed if consumer_elapsed else None,
            "cpu_s": cpu,
            "peak_rss_mb": rss,
            "exit_code": code,
            "consumer": seen,
        }


def connect_time_ns(log_path: Path) -> int:
    """When the agent logged its first broker connection (asctime, local time, milliseconds)."""
    for line in log_path.read_text().splitlines():
        if "Connected to broker" in line:
            stamp, millis = line[:23].split(",")
            return int(
                (time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1e3) * 1e9
            )
    raise RuntimeError(f"no broker connection in {log_path}")


MIXED = ("sine", "ramp", "sine", "counter", "sine", "square", "sine", "ramp") * 2


def point_list(count: int, signals: str) -> int | list[dict[str, Any]]:
    """`sine`: N sines whose values repeat every 17 points (zstd shrinks a reading to ~4 bytes);
    `mixed`: sines, ramps, counters, squares and 1 in 16 random, with varied periods, amplitudes
    and offsets, so every float differs (~13 bytes a reading compressed)."""
    if signals == "sine" or count == 1:
        return count
    return [
        {
            "name": f"p{i}",
            "signal": "random" if i % 16 == 15 else MIXED[i % 16],
            "period": 5 + (i % 7) * 10,
            "amplitude": round(10 + i % 13 * 0.37, 2),
            "offset": i % 11,
        }
        for i in range(count)
    ]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_tables(steps: list[dict[str, Any]], drains: list[dict[str, Any]]) -> None:
    print()
    print("Sustained (fresh buffer per rate; latency = reading ts -> consumer receipt)")
    header = (
        f"{'offered/s':>10} {'produced/s':>11} {'acked/s':>10} {'buffer end':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'CPU':>5} {'CPU s/100k':>10} {'RSS MB':>7} "
        f"{'holes':>5}  sustained"
    )
    print(header)
    print("-" * len(header))
    for s in steps:
        c = s["consumer"]
        print(
            f"{s['offered']:>10,} {s['produced_per_s']:>11,.0f} {s['acked_per_s']:>10,.0f} "
            f"{s['buffer_end']:>10,} {fmt_ms(c['p50_ms']):>7} {fmt_ms(c['p99_ms']):>7} "
            f"{s['cpu_util']:>5.0%} {s['cpu_s_per_100k']:>10.3f} {s['peak_rss_mb']:>7.1f} "
            f"{c['holes']:>5}  {'yes' if s['sustained'] else 'NO'}"
        )
    best = max((s["offered"] for s in steps if s["sustained"]), default=0)
    print(f"highest sustained offered rate: {best:,} readings/s")
    for drain in drains:
        live = drain["live_rate"]
        print()
        print(
            "Drain: backlog sealed during a broker outage, shipped after the agent restarts"
            + (f", while it offers {live:,} readings/s" if live else " (1 reading/s offered)")
        )
        print(
            f"  backlog            {drain['backlog_readings']:,} readings in "
            f"{drain['backlog_batches']:,} batches (sealed at {drain['fill_rate']:,}/s offered "
            f"in {drain['fill_seconds']:.1f} s, peak RSS {drain['fill_peak_rss_mb']:.1f} MB)"
        )
        print(
            f"  drain              {drain['drain_per_s']:,.0f} readings/s "
            f"({drain['drain_seconds']:.2f} s from broker connection to the last backlog "
            "batch received)"
        )
        if drain["consumer_per_s"]:
            print(
                f"  consumer side      {drain['consumer_per_s']:,.0f} readings/s "
                f"(first to last backlog batch received, {drain['consumer_seconds']:.2f} s)"
            )
        c = drain["consumer"]
        print(
            f"  verified           {c['unique']:,} unique readings, {c['holes']} holes, "
            f"{c['readings'] - c['unique']:,} duplicates"
        )
        print(
            f"  agent              {drain['cpu_s']:.2f} CPU s from start to empty buffer, "
            f"peak RSS {drain['peak_rss_mb']:.1f} MB, exit code {drain['exit_code']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--rates", help="comma-separated offered rates (readings/s)")
    parser.add_argument("--window", type=float, help="measurement window per rate, seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--interval", type=float, default=0.1, help="source interval; points = rate x interval"
    )
    parser.add_argument(
        "--signals",
        choices=("sine", "mixed"),
        default="sine",
        help="sine: `points: N` (repetitive, ~4 B/reading compressed); mixed: a "
        "list of varied points (~11 B/reading; use few points, short --interval)",
    )
    parser.add_argument("--batch", type=int, default=1000, help="batch.max_readings")
    parser.add_argument(
        "--format", type=int, choices=(1, 2), default=2, help="batch.format: the payload format"
    )
    parser.add_argument("--inflight", type=int, default=32, help="mqtt.max_inflight")
    parser.add_argument("--drain-readings", type=int, help="backlog for the drain phase")
    parser.add_argument(
        "--fill-rate", type=int, default=200_000, help="offered rate while the broker is down"
    )
    parser.add_argument("--no-drain", action="store_true")
    parser.add_argument(
        "--drain-live",
        help="live loads (readings/s) offered while draining, one drain each "
        "(default 0,100000; --quick: 0)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="measure every rate even after one is not sustained",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        metavar="N",
        help="experiment: run the agent with gc.freeze() after its imports and "
        "gc.set_threshold(N, 10, 10)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the agent over each window into DIR (pip install py-spy)",
    )
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.quick:
        rates = [100_000, 200_000]
        args.window = args.window or 4.0
        args.warmup = min(args.warmup, 2.0)
        drain_target = args.drain_readings or 300_000
        args.drain_live = args.drain_live or "0"
    else:
        rates = [100_000, 200_000, 250_000, 300_000, 350_000, 400_000, 500_000]
        args.window = args.window or 10.0
        drain_target = args.drain_readings or 1_000_000
    if args.rates:
        rates = [int(r) for r in args.rates.split(",")]
    args.drain_live = [int(r) for r in (args.drain_live or "0,100000").split(",")]

    print(
        f"edge-agent pipeline benchmark: {os.cpu_count()} CPUs, load {load()} (1/5 min), "
        f"batch {args.batch}, format {args.format}, window {args.window:.0f}s, "
        f"in-flight {args.inflight}, "
        f"signals {args.signals}"
        + (f", EXPERIMENT gc threshold {args.gc_threshold} + freeze" if args.gc_threshold else "")
    )
    with contextlib.ExitStack() as stack:
        if args.dir:
            directory = Path(args.dir)
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        bench = Bench(args, directory)
        stack.callback(bench.close)
        steps: list[dict[str, Any]] = []
        for rate in rates:
            step = bench.sustained(rate)
            steps.append(step)
            c = step["consumer"]
            print(
                f"  offered {rate:>9,}/s: acked {step['acked_per_s']:>9,.0f}/s, "
                f"p99 {fmt_ms(c['p99_ms'])} ms, CPU {step['cpu_util']:.0%}, "
                f"RSS {step['peak_rss_mb']:.0f} MB, "
                f"{'sustained' if step['sustained'] else 'NOT sustained'} (load {load()})",
                flush=True,
            )
            if not step["sustained"] and not args.keep_going:
                break
        drains = []
        for live in [] if args.no_drain else args.drain_live:
            drain = bench.drain(drain_target, live)
            drains.append(drain)
            print(
                f"  drain {drain['backlog_readings']:,} readings, live load {live:,}/s: "
                f"{drain['drain_per_s']:,.0f}/s (load {load()})",
                flush=True,
            )
        print_tables(steps, drains)
        print(f"\nload after the run: {load()} (1/5 min)")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"steps": steps, "drains": drains, "args": vars(args)}, indent=1)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
