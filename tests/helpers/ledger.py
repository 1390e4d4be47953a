"""The ledger of a fault case: every reading the agent took is verified, declared, or lost.

One ledger per case, from two independent witnesses:

- `taken`, from the agent: the readings it sealed, i.e. that got a `seq` in a committed
  transaction of its buffer (docs/contract.md §4.6: "a reading is durable once it is sealed").
  It is read from the buffer file itself once the agent process has ended (`meta.next_seq - 1`
  per epoch, `sealed_in_store`), so it is exact whether the agent stopped cleanly or was
  SIGKILLed. Readings a source had delivered but the batcher had not sealed at a SIGKILL (at
  most `batch.max_delay` of them) never got a `seq`: they are not taken, and not lost (§4.6).
  For a clean stop the agent seals what is pending first, and the ledger checks that nothing
  fell between the sources and the buffer: the `taken=` and `sealed=` the agent logs when it
  stops cleanly (readings accepted by its batcher, readings it sealed) must agree
  (`clean_stops`).
  An epoch that ended by a quarantine counts with its last committed seq (`Taken.add`, from the
  `quarantined` entry of /status or the witness read before the damage).
- `verified`, `duplicates`, `declared`, from the real `edge-agent verify` process
  (`VerifyProcess`): readings it accepted (distinct `seq` per epoch, signature checked),
  readings it received again, and readings the agent declared and that did not arrive: evicted
  (§4.7) or lost with an epoch declared ended (`previous_epoch`, counted apart as
  `declared_lost`). A reading that arrived and was declared evicted too (a batch in flight
  evicted from a full disk) counts once, as verified (`declared_received`).

The ledger is taken over a final state: `stop_drained` stops the agent cleanly with nothing left
in its buffer (readings still buffered are durable and unsent, neither delivered nor lost).

`lost = taken - verified - declared`, per epoch and in all, and `Ledger.check()` asserts it is 0
(and that verify found no hole and rejected nothing). Each checked ledger prints
`LEDGER <case>: taken=... verified=... duplicates=... declared=... lost=...`, and conftest.py
repeats every line at the end of the session (pytest's terminal summary), so they appear in
`.ci/run`'s log whatever the output capture.

Example (a case of the `faults` layer; `broker`, `keys`, `agents` are conftest fixtures):

    async with VerifyProcess(broker, keys, tmp_path) as verify:   # subscribed on entry
        agent = AgentProcess(agent_config(tmp_path, broker, keys, sources), tmp_path)
        agents.append(agent)
        agent.start()
        ...                                   # the fault
        # stop_drained (a clean stop, nothing left in the buffer), Taken.from_store,
        # verify.collect (until everything taken is accounted for), verify.ledger:
        ledger = await drained_ledger(verify, agent, "broker stopped 30s")
    ledger.check()

A case with a consumer of its own (an in-process Verifier, another verify process) can still
report through here: `Ledger.of_stream("case", taken, stream).check()` (one epoch), or
`.record()` alone where the loss is the point (a mode shown to lose data).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from edge_agent.consumer.completeness import Stream
from edge_agent.demo.broker import Mosquitto
from helpers.agent import AgentProcess
from helpers.wait import wait_for

LINES: list[str] = []
"""Every ledger line of this session, in order; conftest.py prints them at the end. It also
collects lines a test printed itself (`ledger <case>: ... lost=...`) from its captured output."""

GATEWAY = "test-gw"
"""The gateway id of `helpers.agent.agent_config`."""


class Logged(Protocol):
    """Anything with the agent's log (helpers.agent.AgentProcess)."""

    def log(self) -> str: ...


def sealed_in_store(db_path: Path) -> tuple[str, int]:
    """(epoch, last committed seq) of the buffer at `db_path`, read-only, without checkpointing.

    Read it after the agent process has ended: what a commit made durable, nothing pending.
    Raises sqlite3.Error when the file is not a readable buffer.
    """
    # Closed at once (a `with` on a connection only ends a transaction): a connection left open
    # keeps SQLite's shared-memory lock, and the next process to crash would not be recovered
    # by the next reader, which would read the state before the last commit.
    with contextlib.closing(sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)) as db:
        rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('epoch', 'next_seq')"))
    return str(rows["epoch"]), int(rows["next_seq"]) - 1


@dataclass
class Taken:
    """Readings the agent sealed, by epoch: {epoch: last committed seq} (seqs start at 1)."""

    epochs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_store(cls, db_path: Path) -> Taken:
        """The buffer's current epoch and its last committed seq (`sealed_in_store`)."""
        taken = cls()
        taken.add(*sealed_in_store(db_path))
        return taken

    def add(self, epoch: str, last_seq: int) -> None:
        """Count `epoch` as sealed up to `last_seq` (keeps the highest seen)."""
        self.epochs[epoch] = max(self.epochs.get(epoch, 0), last_seq)

    @property
    def total(self) -> int:
        return sum(self.epochs.values())


_STOPPED = re.compile(r"Stopped cleanly buffered_readings=\d+ taken=(\d+) sealed=(\d+)")


def clean_stop_counts(log: str) -> list[tuple[int, int]]:
    """(taken, sealed) of each clean stop the agent logged: readings its batcher accepted from
    the sources in that run, readings it sealed in that run."""
    return [(int(a), int(b)) for a, b in _STOPPED.findall(log)]


async def stop_drained(agent: AgentProcess, attempts: int = 3) -> int:
    """Stop the agent cleanly (SIGTERM, exit 0), leaving nothing in its buffer.

    A clean stop seals what is pending and waits (a bounded time) for the broker to acknowledge
    what is buffered. When it stopped with readings still buffered (they are durable, not lost:
    the next start sends them), it is started again, given the time to send them, and stopped
    again, at most `attempts` times, so that the ledger is taken over a final state. Returns
    how many restarts that took.
    """
    for restarts in range(attempts):
        code = await asyncio.to_thread(agent.stop)  # the test's loop may run a proxy
        assert code == 0, f"the agent exited {code}:\n{agent.log()[-3000:]}"
        left = _BUFFERED.findall(agent.log())[-1]
        if int(left) == 0:
            return restarts
        await asyncio.to_thread(agent.start)
        await wait_for(
            lambda: (
                agent.status()["mqtt"]["connected"] and agent.status()["buffer"]["readings"] < 2000
            ),
            60,
            "the agent to send its buffer",
        )
    raise AssertionError(f"the agent kept readings buffered after {attempts} clean stops")


_BUFFERED = re.compile(r"Stopped cleanly buffered_readings=(\d+)")


async def drained_ledger(
    verify: VerifyProcess,
    agent: AgentProcess,
    case: str,
    *,
    taken: Taken | None = None,
    notes: str = "",
) -> Ledger:
    """The ledger of `case` over its final state, not yet checked (`.check()` it).

    `stop_drained(agent)`, then the agent's buffer read for what it sealed (added to `taken`
    when given: epochs counted before, e.g. one the agent quarantined), `verify.collect` of
    it, and `verify.ledger` with `agent` as a clean stop. The restarts the drain took are
    appended to `notes` (`restarts=N`). Call it inside the `async with VerifyProcess` block.
    """
    restarts = await stop_drained(agent)
    if taken is None:
        taken = Taken()
    taken.add(*sealed_in_store(Path(agent.config["store"]["path"])))
    await verify.collect(taken)
    notes = f"{notes} restarts={restarts}".lstrip()
    return verify.ledger(case, taken, clean_stops=[agent], notes=notes)


@dataclass
class Ledger:
    """One case's account; see the module docstring for the definitions."""

    case: str
    taken: int
    verified: int
    duplicates: int
    declared: int
    declared_lost: int
    """Of `declared`: readings of epochs declared ended (quarantine), not evictions."""
    per_epoch: dict[str, tuple[int, int, int]]
    """epoch -> (taken, verified, declared)."""
    holes: int
    rejected: int
    exit_code: int | None
    notes: str = ""
    declared_received: int = 0
    """Readings declared evicted that had been received all the same (counted as verified,
    not in `declared`): delivered, but not deleted (say on a full disk), then evicted."""

    @property
    def lost(self) -> int:
        return self.taken - self.verified - self.declared

    def line(self) -> str:
        extra = f" (declared-lost={self.declared_lost}: epochs declared ended)"
        return (
            f"LEDGER {self.case}: taken={self.taken} verified={self.verified} "
            f"duplicates={self.duplicates} declared={self.declared} lost={self.lost}"
            + (extra if self.declared_lost else "")
            + (
                f" (declared after delivery={self.declared_received}: counted as verified)"
                if self.declared_received
                else ""
            )
            + (f" [{self.notes}]" if self.notes else "")
        )

    def record(self) -> str:
        """Print the LEDGER line and keep it for the session's summary; return it. Alone (not
        through `check`) only where a loss is the point: a mode that is shown to lose data."""
        line = self.line()
        print(f"\n{line}")
        LINES.append(line)
        return line

    @classmethod
    def of_stream(
        cls, case: str, taken: int, stream: Stream, exit_code: int | None = 0, notes: str = ""
    ) -> Ledger:
        """The ledger of one epoch from a consumer's `Stream` (edge_agent.consumer.completeness,
        e.g. read from a verify state file or an in-process Verifier), `taken` its sealed count."""
        lost_with_end = sum(b - a + 1 for a, b in stream.lost())
        received = stream.received.ranges()
        evicted = _count(_merge(received + stream.evicted.ranges())) - _count(received)
        declared = evicted + lost_with_end
        return cls(
            case, taken, stream.readings, stream.duplicates, declared, lost_with_end,
            {"": (taken, stream.readings, declared)}, len(stream.holes()), 0, exit_code, notes,
            declared_received=stream.evicted_count - evicted,
        )  # fmt: skip

    def check(self) -> Ledger:
        """Print and record the LEDGER line, then assert lost == 0 in all and per epoch."""
        line = self.record()
        assert self.taken > 0, f"{line}: the agent took nothing"
        for epoch, (taken, verified, declared) in self.per_epoch.items():
            assert taken - verified - declared == 0, (
                f"{line}: epoch {epoch}: taken={taken} verified={verified} declared={declared}"
            )
        assert self.lost == 0, line
        assert self.holes == 0 and self.rejected == 0, (
            f"{line}: verify found holes={self.holes} rejected={self.rejected}"
        )
        assert self.exit_code == 0, f"{line}: verify exited {self.exit_code}"
        return self


class VerifyProcess:
    """The real `edge-agent verify --json --state FILE` on `site/test/#`, with its own session.

    `async with` starts it and waits until Mosquitto logged its subscription (from then on its
    persistent session holds every batch); leaving stops it (SIGTERM), which writes the state.
    `collect(taken)` waits until everything taken is accounted for; `ledger()` reads the state.
    """

    def __init__(
        self, broker: Mosquitto, keys: Path, directory: Path, name: str = "ledger"
    ) -> None:
        self.broker = broker
        self.key = keys / "signing.pub"
        self.client_id = f"verify-{name}-{broker.port}"
        self.state = directory / f"verify-{name}.json"
        self.out = directory / f"verify-{name}.out"
        self.err = directory / f"verify-{name}.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self._read = 0
        self._progress = 0
        self._runs = 0

    async def __aenter__(self) -> VerifyProcess:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.stop()
        elif self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    async def start(self) -> None:
        """Start (or restart, resuming its state and session) and wait for its subscription."""
        self._runs += 1
        self._read = 0
        self._progress = 0
        with self.out.open("wb") as out, self.err.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "verify", "--url", self.broker.url,
                 "--topic", "site/test/#", "--key", str(self.key), "--client-id", self.client_id,
                 "--state", str(self.state), "--json"],
                stdout=out, stderr=err,
            )  # fmt: skip
        mark = f"{self.client_id} 1 site/test/#"
        await wait_for(
            lambda: self.broker.log_path.read_text().count(mark) >= self._runs,
            30,
            "verify's subscription",
        )

    def progress(self) -> int:
        """Readings printed plus readings declared evicted since this run started (a declared
        range may be counted twice when re-declared: only a hint for waiting)."""
        with self.out.open("rb") as out:
            out.seek(self._read)
            chunk = out.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._read += len(complete)
        for line in complete.splitlines():
            if line.startswith(b"{"):
                self._progress += 1
            elif line.startswith(b"# ") and b" declared evicted " in line:
                for first, last in re.findall(rb"(\d+)\.\.(\d+)", line):
                    self._progress += int(last) - int(first) + 1
        return self._progress

    def stop(self) -> int:
        """SIGTERM and wait: it handles what it received, writes its state, exits."""
        if self.process is None:
            assert self.exit_code is not None
            return self.exit_code
        self.process.send_signal(signal.SIGTERM)
        self.exit_code = self.process.wait(timeout=60)
        self.process = None
        return self.exit_code

    def streams(self) -> dict[str, dict[str, Any]]:
        """The state file's streams of our gateway, by epoch (after `stop`)."""
        data = json.loads(self.state.read_text()) if self.state.exists() else {}
        found = {}
        for key, stream in data.items():
            gateway, _, epoch = key.partition("\n")
            if gateway == GATEWAY:
                found[epoch] = stream
        return found

    def accounted(self, taken: Taken) -> int:
        """Of `taken`, how many the saved state holds, received or declared (after `stop`)."""
        streams = self.streams()
        total = 0
        for epoch, last in taken.epochs.items():
            stream = streams.get(epoch)
            if stream is not None:
                total += _covered(stream, last)
        return total

    async def collect(self, taken: Taken, timeout: float = 60, quiet: float = 3.0) -> None:
        """Wait until verify accounted for everything `taken`, then stop it (state written).

        Waits on its output until it printed or saw declared as many readings as were missing
        when this run started, or printed nothing for `quiet` s (a tail declared lost with an
        ended epoch prints nothing); then stops it and reads its state. While something is
        still missing and `timeout` s have not passed, it is started again on the same state
        and session (as an operator would) and waited for the rest. What is missing at the
        end is left for `ledger()` to report as lost.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            missing = taken.total - self.accounted(taken)  # the state as this run started
            if self.process is None:
                await self.start()
            last, changed = self.progress(), loop.time()
            while self.progress() < missing and loop.time() < end:
                if self.progress() != last:
                    last, changed = self.progress(), loop.time()
                elif loop.time() - changed > quiet:
                    break
                await asyncio.sleep(0.1)  # a separate process: its output is the only signal
            self.stop()
            if self.accounted(taken) >= taken.total or loop.time() >= end:
                return

    def ledger(
        self,
        case: str,
        taken: Taken,
        *,
        clean_stops: Sequence[Logged] = (),
        notes: str = "",
    ) -> Ledger:
        """The ledger of `case` from the saved state (stops verify first if it still runs).

        `clean_stops`: agents that stopped cleanly; each clean stop's logged `taken` and
        `sealed` must agree (nothing lost between the sources and the buffer).
        """
        self.stop()
        for agent in clean_stops:
            counts = clean_stop_counts(agent.log())
            assert counts, "the agent logged no clean stop"
            for accepted, sealed in counts:
                assert accepted == sealed, (
                    f"{case}: the batcher accepted {accepted} readings but sealed {sealed}"
                )
        streams = self.streams()
        verified = duplicates = declared = declared_lost = holes = declared_received = 0
        per_epoch = {}
        for epoch, stream in streams.items():
            received = _count(stream["received"])
            # A reading both received and declared evicted (delivered, but its delete failed,
            # e.g. on a full disk, and it was evicted later) counts once, as verified.
            evicted = _count(_merge(stream["received"] + stream["evicted"])) - received
            declared_received += _count(stream["evicted"]) - evicted
            verified += received
            duplicates += stream["duplicates"]
            lost_with_end = 0
            if stream["ended"] is not None:
                lost_with_end = _count(_missing(stream, stream["max_seq"]))
            else:
                holes += len(_missing(stream, stream["max_seq"]))
            declared += evicted + lost_with_end
            declared_lost += lost_with_end
            per_epoch[epoch] = (taken.epochs.get(epoch, 0), received, evicted + lost_with_end)
        for epoch, last in taken.epochs.items():
            per_epoch.setdefault(epoch, (last, 0, 0))
        return Ledger(
            case, taken.total, verified, duplicates, declared, declared_lost, per_epoch,
            holes, rejected=_rejected(self.err), exit_code=self.exit_code, notes=notes,
            declared_received=declared_received,
        )  # fmt: skip


def _count(ranges: list[list[int]]) -> int:
    return sum(last - first + 1 for first, last in ranges)


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged


def _missing(stream: dict[str, Any], upto: int) -> list[list[int]]:
    """Seq ranges in 1..upto neither received nor declared evicted."""
    found, cursor = [], 1
    for first, last in _merge(stream["received"] + stream["evicted"]):
        if first > upto:
            break
        if first > cursor:
            found.append([cursor, first - 1])
        cursor = max(cursor, last + 1)
    if cursor <= upto:
        found.append([cursor, upto])
    return found


def _covered(stream: dict[str, Any], upto: int) -> int:
    """How many of 1..upto the stream received, had declared evicted, or declared lost."""
    if stream["ended"] is not None:
        return upto  # declared ended: what did not arrive is declared lost
    return upto - _count(_missing(stream, upto))


def _rejected(err: Path) -> int:
    """Batches verify rejected (its `REJECTED N batches` summary lines, over its runs)."""
    text = err.read_text(errors="replace") if err.exists() else ""
    return sum(int(n) for n in re.findall(r"^REJECTED (\d+) batches", text, re.MULTILINE))
