"""A one-hour outage at 1,000 readings/s, then the broker returns while fresh readings keep coming.

Issue 9 item 9. All real: the agent (`python -m edge_agent run`), a private Mosquitto, and the
consumer of bench/pipeline.py (paho, MQTT 5, persistent session; every batch opened with the real
Opener and checked for completeness by `seq`).

1. The backlog, built through the real code path at an accelerated rate: with the broker down,
   an agent whose simulated source offers --fill-rate readings/s (default 100,000/s, `mixed`
   signals, ~13 bytes a reading compressed) seals readings into its buffer until it holds
   --hours x 3,600 x --rate readings (default 3,600,000), then stops. The batches have the shape
   an hour at 1,000/s gives them (batch.max_readings 1,000 reached every second); their `ts` and
   sealing times span the fill, not an hour (nothing in the drain depends on them).
2. The outage goes on: a new agent starts on that buffer with the defaults of `mqtt` (keep-alive,
   reconnect backoff), its source offering --rate readings/s (fresh data), the broker still down
   for --outage seconds (its backoff reaches its ceiling).
3. The broker returns (t0). Measured: when the agent reconnected (its log) and the consumer got
   the first batch after t0; the last backlog batch (the drain time, and the drain speed
   relative to real time: 3,600 s / drain time); the fresh readings' latency, reading `ts` ->
   receipt and sealing -> receipt, p50/p99, for the readings taken once the agent was connected
   again (all of them, during the drain and --tail seconds after it); and the same from reading
   for every reading taken after t0 (`since_return`: those taken before the agent's reconnect
   attempt found the broker back waited for it, up to `mqtt.reconnect_max`).

    .venv/bin/python bench/drain.py                # the issue's case, ~3 minutes
    .venv/bin/python bench/drain.py --hours 0.1    # a quick run

Targets (issue 9): drain >= 20x real time (an hour in <= 180 s), fresh p99 < 2 s, first batch
within a few seconds. Results: docs/performance.md, "Drain with fresh data flowing".
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from pipeline import (  # noqa: E402
    GATEWAY,
    TOPIC_PREFIX,
    AgentProcess,
    Consumer,
    connect_time_ns,
    point_list,
)

from edge_agent.demo.broker import Mosquitto, free_port  # noqa: E402
from edge_agent.seal.keys import write_keypair  # noqa: E402


def agent_config(
    broker: Mosquitto, keys: Path, store: Path, points: int, interval: float
) -> dict[str, Any]:
    """The defaults of `mqtt` and `batch`, a simulated source of `points` every `interval` s."""
    return {
        "gateway": {"id": GATEWAY},
        "store": {"path": str(store)},
        "mqtt": {"url": broker.url, "topic_prefix": TOPIC_PREFIX},
        "signing": {"key_file": str(keys / "signing.key")},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        "sources": [
            {
                "type": "simulated",
                "name": "sim",
                "interval": interval,
                "points": point_list(points, "mixed"),
            }
        ],
    }


def fill(directory: Path, broker: Mosquitto, keys: Path, store: Path, target: int,
         rate: int) -> dict[str, Any]:  # fmt: skip
    """Seal at least `target` readings into `store` with the broker down (step 1)."""
    interval = 0.05
    config = agent_config(broker, keys, store, round(rate * interval), interval)
    filler = AgentProcess(directory, config, "agent-fill")
    filler.start()
    began = time.monotonic()
    try:
        while filler.buffered()[0] < target:
            if time.monotonic() - began > 900:
                raise TimeoutError(f"the buffer reached only {filler.buffered()[0]} readings")
            time.sleep(0.5)
    finally:
        filler.stop()
    with closing(sqlite3.connect(store)) as db:
        readings, batches, last_seq, size = db.execute(
            "SELECT coalesce(sum(readings), 0), count(*), max(last_seq), sum(length(data))"
            " FROM batches"
        ).fetchone()
    return {
        "backlog_readings": readings,
        "backlog_batches": batches,
        "backlog_bytes": size,
        "last_seq": last_seq,
        "fill_seconds": round(time.monotonic() - began, 1),
    }


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    keys = directory / "keys"
    write_keypair(keys)
    broker_dir = directory / "broker"
    broker_dir.mkdir()
    broker = Mosquitto(directory=broker_dir)
    broker.start()
    consumer = Consumer(broker.port, keys / "signing.pub")
    agents: list[AgentProcess] = []
    try:
        if not consumer.call("connected", 10.0):
            raise RuntimeError("the consumer did not connect")
        broker.stop()  # the consumer's session stays; the outage begins
        store = directory / "buffer.db"
        target = round(args.hours * 3600 * args.rate)
        result = fill(directory, broker, keys, store, target, args.fill_rate)
        interval = 0.1
        config = agent_config(broker, keys, store, round(args.rate * interval), interval)
        drainer = AgentProcess(directory, config, "agent-drain")
        agents.append(drainer)
        drainer.start()
        time.sleep(args.outage)
        broker.start()
        t0_ns = time.time_ns()
        if not consumer.call("connected", 10.0):
            raise RuntimeError("the consumer did not reconnect")
        began = time.monotonic()
        samples = []
        while True:
            status = json.loads(drainer._get("/status"))
            samples.append(status["buffer"])
            if status["buffer"]["readings"] <= 2 * args.rate:
                break
            if time.monotonic() - began > 900:
                raise TimeoutError("the backlog did not drain in 15 minutes")
            time.sleep(0.5)
        time.sleep(args.tail)  # fresh readings flowing after the drain
        cpu = drainer.cpu_s()
        rss = drainer.peak_rss_mb()
        code = drainer.stop()
        consumer.settle()
        connected_ns = connect_time_ns(drainer.log_path)
        end_ns = time.time_ns() + 10**12
        options = {"upto_seq": result["last_seq"], "window": (connected_ns, end_ns),
                   "also": (t0_ns, end_ns)}  # fmt: skip
        seen = consumer.call("take", options)
        drain_s = (seen["last_recv_ns"] - t0_ns) / 1e9
        etas = [s["drain"]["eta_s"] for s in samples if s.get("drain", {}).get("eta_s")]
        result.update(
            {
                "rate": args.rate,
                "outage_s": args.outage,
                "reconnected_s": round((connected_ns - t0_ns) / 1e9, 2),
                "first_batch_s": round((seen["first_any_ns"] - t0_ns) / 1e9, 2),
                "drain_s": round(drain_s, 1),
                "real_time_factor": round(result["backlog_readings"] / args.rate / drain_s, 1),
                "drain_readings_per_s": round(result["backlog_readings"] / drain_s),
                "fresh_p50_ms": seen["p50_ms"] and round(seen["p50_ms"]),
                "fresh_p99_ms": seen["p99_ms"] and round(seen["p99_ms"]),
                "fresh_max_ms": seen["max_ms"] and round(seen["max_ms"]),
                "fresh_sealed_p50_ms": seen["sealed_p50_ms"] and round(seen["sealed_p50_ms"]),
                "fresh_sealed_p99_ms": seen["sealed_p99_ms"] and round(seen["sealed_p99_ms"]),
                "fresh_readings": seen["latency_samples"],
                "since_return_p50_ms": seen["also_p50_ms"] and round(seen["also_p50_ms"]),
                "since_return_p99_ms": seen["also_p99_ms"] and round(seen["also_p99_ms"]),
                "holes": seen["holes"],
                "first_eta_s": etas[0] if etas else None,
                "agent_cpu_s": round(cpu, 1),
                "agent_peak_rss_mb": round(rss),
                "exit_code": code,
            }
        )
        return result
    finally:
        for agent in agents:
            agent.kill()
        consumer.close()
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hours", type=float, default=1.0, help="outage length to buffer")
    parser.add_argument("--rate", type=int, default=1000, help="readings/s, fresh and buffered")
    parser.add_argument(
        "--fill-rate", type=int, default=100_000, help="readings/s offered to build the backlog"
    )
    parser.add_argument(
        "--outage", type=float, default=15.0, help="seconds the new agent waits for the broker"
    )
    parser.add_argument(
        "--tail", type=float, default=5.0, help="seconds of fresh data after the backlog is gone"
    )
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.dir:
        directory = Path(args.dir)
        directory.mkdir(parents=True, exist_ok=True)
        result = run(args, directory)
    else:
        with tempfile.TemporaryDirectory(prefix="edge-drain-") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))
    met = (
        result["real_time_factor"] >= 20
        and (result["fresh_p99_ms"] or 0) < 2000
        and result["holes"] == 0
    )
    print(
        f"targets {'met' if met else 'MISSED'}: drain {result['real_time_factor']}x real time"
        f" (>= 20), fresh p99 {result['fresh_p99_ms']} ms (< 2000), first batch"
        f" {result['first_batch_s']} s after the broker returned, holes {result['holes']}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
