"""The CPU to seal readings, payload format 1 against format 2, with nothing else in the process.

`bench/pipeline.py` measures the whole agent (sources, batcher, SQLite, MQTT) on a machine that
others share; this isolates the sealing step (`Sealer.seal`: encode, zstd, Ed25519) so that the
two formats can be compared reproducibly. Cases:

- `pipeline`: what `bench/pipeline.py` seals at its first rate (100,000 readings/s offered:
  10,000 points of its default simulated source, full-precision sines, every 0.1 s, batches
  of 1,000: every reading of a batch is a different point).
- `mix1k`, `mix10k`: the plant mix of bench/plant_mix.py at 1 s, batches of 1,000 and 10,000.

Two measures:

Each run seals the case's readings once to warm the Sealer up (format 1 caches encoded names,
format 2 its batch shapes and each point's decimal places), then is measured sealing them again
(`--cold`: a fresh Sealer, first sight of every point included).

- CPU time (`time.process_time`), best of `--repeat` runs, formats alternately, per 100,000
  readings (noisy on a shared machine: compare the best of several).
- `--callgrind`: instructions counted by `valgrind --tool=callgrind`, repeatable to a fraction
  of a percent: the script runs itself under callgrind twice per case and format, once sealing
  and once doing everything but the measured sealing (`--dry`), and prints the difference.

    .venv/bin/python bench/seal_cpu.py                     # CPU time, all cases, ~30 s
    .venv/bin/python bench/seal_cpu.py --callgrind         # instructions, ~3-5 min
    .venv/bin/python bench/seal_cpu.py --case pipeline --callgrind
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plant_mix
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.config.simulated import SimulatedSourceConfig
from edge_agent.reading import Reading
from edge_agent.seal.envelope import Sealer
from edge_agent.sources.simulated import SimulatedSource

CASES = ("pipeline", "mix1k", "mix10k")
READINGS = 100_000
CLOCK = {"synced": True, "error_ns": 1_000_000, "boot": "b" * 32, "mono": 1}
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def case_readings(case: str) -> tuple[list[Reading], int]:
    """The readings of `case` and its batch size."""
    if case == "pipeline":
        source = SimulatedSource(
            SimulatedSourceConfig(type="simulated", name="sim", interval=0.1, points=10_000)
        )
        start = 1_767_225_600_000_000_000
        out: list[Reading] = []
        for tick in range(READINGS // 10_000):
            out.extend(source.readings(tick, start + tick * 100_000_000))
        return out, 1_000
    return plant_mix.readings(READINGS, 1.0), 1_000 if case == "mix1k" else 10_000


CATALOGUE = "--catalogue" in sys.argv
"""Format 2 referencing the point catalogue (§4.12, the agent's default since contract 2.4)."""


def seal_all(chunks: list[list[Reading]], payload_format: int, dry: bool, cold: bool) -> float:
    """CPU seconds to seal `chunks` with a Sealer that has sealed them once already (unless
    `cold`): the agent's steady state, every point seen before, as in bench/pipeline.py's
    windows after their warm-up. `dry`: the warm-up only (for the callgrind difference)."""
    sealer = Sealer(KEY, payload_format=payload_format, catalogue=CATALOGUE)
    seq = 1
    for batch, chunk in enumerate([] if cold else chunks, 1):
        sealer.seal(gateway="bench-gw", epoch="e" * 32, batch=batch, first_seq=seq,
                    readings=chunk, sealed_ns=seq, clock=CLOCK)  # fmt: skip
        seq += len(chunk)
    start = time.process_time()
    for batch, chunk in enumerate(chunks, len(chunks) + 1):
        if not dry:
            sealer.seal(gateway="bench-gw", epoch="e" * 32, batch=batch, first_seq=seq,
                        readings=chunk, sealed_ns=seq, clock=CLOCK)  # fmt: skip
        seq += len(chunk)
    return time.process_time() - start


def chunks_of(case: str) -> list[list[Reading]]:
    readings, size = case_readings(case)
    return [readings[i : i + size] for i in range(0, len(readings), size)]


def callgrind(case: str, payload_format: int, cold: bool) -> int:
    """Instructions to seal the case's 100,000 readings (sealing run minus dry run)."""
    counts = []
    for dry in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cg.out"
            command = [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                sys.executable, __file__, "--case", case, "--format", str(payload_format),
                "--once", *(["--dry"] if dry else []), *(["--cold"] if cold else []),
                *(["--catalogue"] if CATALOGUE else []),
            ]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True)
            found = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
            assert found, "no summary line in the callgrind output"
            counts.append(int(found.group(1)))
    return counts[0] - counts[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--case", choices=CASES, action="append", help="default: all")
    parser.add_argument("--format", type=int, choices=(1, 2), action="append")
    parser.add_argument("--repeat", type=int, default=7, help="CPU runs per format (best kept)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--cold", action="store_true", help="a fresh Sealer: first sight")
    parser.add_argument(
        "--catalogue", action="store_true", help="format 2 referencing the point catalogue"
    )
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases, formats = args.case or list(CASES), args.format or [1, 2]
    if args.once:  # one run of one case, under callgrind
        chunks = chunks_of(cases[0])
        gc.collect()
        gc.freeze()
        seal_all(chunks, formats[0], args.dry, args.cold)
        return 0
    print(f"sealing CPU per 100,000 readings, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    for case in cases:
        if args.callgrind:
            found = {f: callgrind(case, f, args.cold) for f in formats}
            text = ", ".join(f"format {f}: {n / 1e6:,.1f} M instructions" for f, n in found.items())
            ratio = f" (2/1: {found[2] / found[1]:.2f})" if len(found) == 2 else ""
            print(f"  {case:8} {text}{ratio}", flush=True)
            continue
        chunks = chunks_of(case)
        gc.collect()
        gc.freeze()
        best: dict[int, list[float]] = {f: [] for f in formats}
        for _ in range(args.repeat):
            for f in formats:
                best[f].append(seal_all(chunks, f, False, args.cold))
        gc.unfreeze()
        text = ", ".join(
            f"format {f}: {min(t):.3f} s (median {sorted(t)[len(t) // 2]:.3f})"
            for f, t in best.items()
        )
        print(f"  {case:8} {text} (load {os.getloadavg()[0]:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
