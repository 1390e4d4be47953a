"""The "plant mix": reference readings for the wire-size benchmark (bench/wire_size.py).

A deterministic stand-in for what a gateway on a mine or a process plant sends: 200 tags on
four sources, polled every 1 s or every 100 ms, with the values as edge-agent's own decoders
deliver them. Same seed, same readings, on every machine.

Sources (names as a site would write them):

- `crusher-plc`, Modbus TCP, 60 tags; `conveyor-plc`, Modbus TCP, 50 tags; `pumps-rtu`, Modbus
  RTU, 30 tags: timestamps are the poll's start, shared by the poll (as §4.4 says for Modbus),
  each source on its own phase, with up to 3 ms of jitter.
- `mill-ua`, OPC UA, 60 tags: the server's SourceTimestamp, its 10 ms scan (each tag from one of
  the last four scans), and `sc` 0 when good.

Signal kinds, and their share of the 200 tags:

- `analog`, 90 (45%): 4-20 mA transmitters (pressures, flows, currents, levels) read through
  12-bit (2/3) or 16-bit (1/3) converters: a slow process drift plus Gaussian sensor noise of
  0.7-3 counts, quantised to counts. 2/3 arrive as scaled integers (`scale` 0.1, 0.01 or 0.05,
  maybe an offset, as the Modbus decoder rounds them), 1/3 as float32 engineering values (the
  shortest decimal that is the float32, as the Modbus decoder gives them).
- `slow`, 30 (15%): temperatures and tank levels: sines with periods of 10-60 min, 16-bit,
  float32, little noise.
- `counter`, 20 (10%): totalisers and production counters (uint32) whose increment per poll
  varies with the process.
- `bool`, 30 (15%): motors running, valves open, alarms: change about every 10 minutes.
- `enum`, 14 (7%): machine states and modes 0-7: change about every 5 minutes.
- `text`, 4 (2%): recipe and batch names: change about every 30 minutes.
- `noise`, 12 (6%): incompressible: float64 values with a random 52-bit mantissa (computed
  vibration features), independent at every poll.

Tag names are `EQUIPMENT.measure` (`CR01.motor_current_A`), 26 characters with the source on
average.

Quality: one `analog` tag of `pumps-rtu` has a failed sensor for 20% of the time (`bad`, value
None); on `mill-ua` every reading carries `sc` (0 when good) and one tag is `uncertain`
(0x40000000) 10% of the time. Everything else is `good`.

At 100 ms the same tags are polled ten times as often: the process moves a tenth as far between
two readings, the noise is the same (it is the sensor's).
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from edge_agent.reading import Quality, Reading, Value
from edge_agent.sources.modbus.decode import scaled, shortest_float32

KINDS = ("analog", "slow", "counter", "bool", "enum", "text", "noise")
SHARES = {"analog": 90, "slow": 30, "counter": 20, "bool": 30, "enum": 14, "text": 4, "noise": 12}
SOURCES = (("crusher-plc", 60), ("conveyor-plc", 50), ("pumps-rtu", 30), ("mill-ua", 60))
START_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
UNCERTAIN = 0x40000000

EQUIPMENT = {
    "crusher-plc": ("CR01", "CR02", "FD01", "SC01", "HP01"),
    "conveyor-plc": ("CV101", "CV102", "CV103", "CV104", "BW01"),
    "pumps-rtu": ("P201", "P202", "P203"),
    "mill-ua": ("SAG01", "BM01", "BM02", "CYC01", "TH01"),
}
MEASURES = {
    "analog": ("motor_current_A", "discharge_pressure_kPa", "flow_m3h", "level_pct", "speed_rpm",
               "power_kW", "density_kgm3", "feed_rate_tph"),
    "slow": ("bearing_temp_C", "oil_temp_C", "tank_level_m", "winding_temp_C"),
    "counter": ("total_t", "energy_kWh", "starts_count", "run_hours"),
    "bool": ("running", "fault", "valve_open", "interlock_ok", "local_mode"),
    "enum": ("state", "mode", "alarm_class"),
    "text": ("recipe", "batch_id", "operator_msg"),
    "noise": ("vib_rms_mms", "vib_peak_g", "crest_factor"),
}  # fmt: skip


@dataclass
class Tag:
    """One point of the mix and its state."""

    source: str
    name: str
    kind: str
    rng: random.Random
    bits: int = 12
    scale: float = 0.1
    offset: float = 0.0
    as_float32: bool = False
    noise: float = 1.0
    level: float = 0.0
    drift: float = 0.0
    period_s: float = 600.0
    value: Value = None
    change_per_s: float = 0.0

    def sample(self, t_s: float, dt_s: float) -> Value:
        """The tag's value at `t_s`, `dt_s` after the previous sample."""
        rng = self.rng
        full = (1 << self.bits) - 1
        if self.kind == "analog":
            self.drift += rng.gauss(0.0, 0.002 * full * math.sqrt(dt_s))
            self.drift *= 0.999**dt_s
            counts = min(full, max(0, round(self.level + self.drift + rng.gauss(0, self.noise))))
            return self._engineering(counts, full)
        if self.kind == "slow":
            phase = 2 * math.pi * t_s / self.period_s
            counts = self.level + 0.15 * full * math.sin(phase) + rng.gauss(0, self.noise)
            return self._engineering(min(full, max(0, round(counts))), full)
        if self.kind == "counter":
            assert isinstance(self.value, int)
            self.value += max(0, round(rng.gauss(self.level * dt_s, self.noise * math.sqrt(dt_s))))
            self.value &= 0xFFFFFFFF
            return self.value
        if self.kind in ("bool", "enum", "text") and rng.random() < self.change_per_s * dt_s:
            if self.kind == "bool":
                self.value = not self.value
            elif self.kind == "enum":
                self.value = rng.randrange(8)
            else:
                self.value = f"{self.name.rsplit('.', 1)[-1].upper()}-{rng.randrange(10**6):06d}"
            return self.value
        if self.kind == "noise":
            return (
                struct.unpack("<d", struct.pack("<Q", 0x3FF0000000000000 | rng.getrandbits(52)))[0]
                * self.scale
            )
        return self.value

    def _engineering(self, counts: int, full: int) -> float:
        if self.as_float32:
            span = self.scale * full
            return shortest_float32(
                struct.unpack("<f", struct.pack("<f", self.offset + counts / full * span))[0]
            )
        value = scaled(counts, self.scale, self.offset)
        assert isinstance(value, float)
        return value


def tags(seed: int = 14) -> list[Tag]:
    """The 200 tags, kinds spread over the sources as the table in the docstring says."""
    rng = random.Random(seed)
    kinds = [kind for kind in KINDS for _ in range(SHARES[kind])]
    rng.shuffle(kinds)
    out: list[Tag] = []
    used: set[str] = set()
    position = 0
    for source, size in SOURCES:
        for kind in kinds[position : position + size]:
            name = ""
            while not name or name in used:
                name = f"{rng.choice(EQUIPMENT[source])}.{rng.choice(MEASURES[kind])}"
                if name in used:
                    name = f"{name}_{rng.randrange(2, 9)}"
            used.add(name)
            out.append(_tag(source, name, kind, random.Random(rng.getrandbits(64))))
        position += size
    return out


def _tag(source: str, name: str, kind: str, rng: random.Random) -> Tag:
    tag = Tag(source, name, kind, rng)
    if kind in ("analog", "slow"):
        tag.bits = 16 if rng.random() < 1 / 3 or kind == "slow" else 12
        full = (1 << tag.bits) - 1
        tag.as_float32 = kind == "slow" or rng.random() < 1 / 3
        tag.scale = (
            rng.choice((0.1, 0.01, 0.05)) if not tag.as_float32 else rng.choice((0.01, 0.002))
        )
        tag.offset = rng.choice((0.0, 0.0, -50.0, 4.0))
        tag.noise = rng.uniform(0.7, 3.0) if kind == "analog" else 0.3
        tag.level = rng.uniform(0.2, 0.8) * full
        tag.period_s = rng.uniform(600, 3600)
    elif kind == "counter":
        tag.value = rng.randrange(10**6, 10**9)
        tag.level = rng.choice((0.0, 0.5, 3.0, 25.0, 400.0))
        tag.noise = tag.level / 4
    elif kind == "bool":
        tag.value = rng.random() < 0.7
        tag.change_per_s = 1 / 600
    elif kind == "enum":
        tag.value = rng.randrange(8)
        tag.change_per_s = 1 / 300
    elif kind == "text":
        tag.value = f"{name.rsplit('.', 1)[-1].upper()}-{rng.randrange(10**6):06d}"
        tag.change_per_s = 1 / 1800
    elif kind == "noise":
        tag.scale = rng.choice((1.0, 4.0, 0.25))
    return tag


def readings(
    count: int, interval_s: float = 1.0, *, seed: int = 14, kinds: tuple[str, ...] = KINDS
) -> list[Reading]:
    """The first `count` readings of the mix polled every `interval_s`, in the order sealed.

    `kinds` keeps only the tags of those kinds (their readings are the same as in the full mix).
    """
    return list(islice_readings(count, interval_s, seed=seed, kinds=kinds))


def islice_readings(
    count: int, interval_s: float, *, seed: int, kinds: tuple[str, ...]
) -> Iterator[Reading]:
    all_tags = tags(seed)
    timing = random.Random(seed + 1)
    phases = {source: timing.uniform(0, interval_s) for source, _ in SOURCES}
    by_source = {s: [t for t in all_tags if t.source == s] for s, _ in SOURCES}
    failed = next(t for t in by_source["pumps-rtu"] if t.kind == "analog")
    doubtful = next(t for t in by_source["mill-ua"] if t.kind == "analog")
    produced = 0
    tick = 0
    while True:
        polls = sorted(phases.items(), key=lambda item: item[1])
        for source, phase in polls:
            t_s = tick * interval_s + phase
            poll_ns = START_NS + round(t_s * 1e9) + timing.randrange(0, 3_000_000)
            for tag in by_source[source]:
                value = tag.sample(t_s, interval_s)
                if tag.kind not in kinds:
                    continue
                quality, code = Quality.GOOD, None
                ts = poll_ns
                if source == "mill-ua":
                    scan = (poll_ns // 10_000_000 - timing.randrange(0, 4)) * 10_000_000
                    ts, code = scan, 0
                    if tag is doubtful and (t_s % 600) < 60:
                        quality, code = Quality.UNCERTAIN, UNCERTAIN
                if tag is failed and (t_s % 900) < 180:
                    value, quality = None, Quality.BAD
                yield Reading(source, tag.name, ts, value, quality, code)
                produced += 1
                if produced >= count:
                    return
        tick += 1
