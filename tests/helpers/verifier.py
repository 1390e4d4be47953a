"""The consumer side of the end-to-end tests: a running verifier, and `edge-agent status`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from edge_agent.consumer.completeness import Completeness, Stream
from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.envelope import Opener
from edge_agent.seal.keys import load_public_key
from helpers.agent import AgentProcess
from helpers.wait import deadline, wait_for


def status_command(agent: AgentProcess) -> int:
    """The exit status of `edge-agent status` against the agent (0 healthy, 1 degraded, 2 down)."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "status", "--url", agent.health_url],
        capture_output=True, check=False,
    ).returncode  # fmt: skip


@asynccontextmanager
async def running_verifier(broker: Mosquitto, keys: Path) -> AsyncIterator[Verifier]:
    """A Verifier consuming `site/test/#` with a persistent session, subscribed on entry."""
    verifier = Verifier(Opener([load_public_key(keys / "signing.pub")]))
    stop, subscribed = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        consume(
            verifier,
            lambda: consumer_client(broker.url, f"verifier-{broker.port}"),
            "site/test/#",
            lambda batch, fresh: None,
            stop,
            subscribed=subscribed,
        )
    )
    async with deadline(10, "the verifier's subscription"):
        await subscribed.wait()
    try:
        yield verifier
    finally:
        stop.set()
        async with deadline(10, "the verifier to stop"):
            await task


class VerifyProcess:
    """The real `edge-agent verify` process, with `--state` (and `--ack-key` when given)."""

    def __init__(
        self,
        broker: Mosquitto,
        keys: Path,
        directory: Path,
        *,
        ack_key: Path | None = None,
        client_id: str = "verify-acks",
    ) -> None:
        self.broker = broker
        self.keys = keys
        self.state = directory / "verify-state.json"
        self.log_path = directory / "verify.log"
        self.ack_key = ack_key
        self.client_id = client_id
        self.process: subprocess.Popen[bytes] | None = None

    def _subscriptions(self) -> int:
        log = self.broker.log_path.read_text() if self.broker.log_path.exists() else ""
        return log.count(f" {self.client_id} 1 site/test/#")

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait (reading the broker's log) until its subscription is in place."""
        before = self._subscriptions()
        command = [
            sys.executable, "-m", "edge_agent", "verify", "--url", self.broker.url,
            "--topic", "site/test/#", "--key", str(self.keys / "signing.pub"),
            "--state", str(self.state), "--client-id", self.client_id, "--quiet",
        ]  # fmt: skip
        if self.ack_key is not None:
            command += ["--ack-key", str(self.ack_key)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        end = time.monotonic() + timeout
        while self._subscriptions() <= before:
            if self.process.poll() is not None:
                raise RuntimeError(f"verify exited at start:\n{self.log()}")
            if time.monotonic() > end:
                raise TimeoutError(f"verify not subscribed within {timeout:g}s:\n{self.log()}")
            time.sleep(0.05)  # a separate process: the broker's log is what announces it

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop it with `sig` (SIGTERM: a clean stop, state saved, final ack) and return its
        exit status (-9 after SIGKILL)."""
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stream(self, epoch: str, gateway: str = "test-gw") -> Stream:
        """What the state file says of (gateway, epoch); an empty Stream when nothing yet."""
        if not self.state.exists():
            return Stream()
        tracker = Completeness.from_json(json.loads(self.state.read_text()))
        return tracker.streams.get((gateway, epoch), Stream())


def ledger(name: str, taken: int, stream: Stream) -> int:
    """Print `taken / verified / duplicates / declared / lost` for one case; return lost.

    taken: readings the agent sealed (its last seq); verified: distinct readings the consumer
    holds; declared: readings declared evicted; lost = taken - verified - declared.
    """
    lost = taken - stream.readings - stream.evicted_count
    print(
        f"LEDGER {name}: taken={taken} verified={stream.readings} "
        f"duplicates={stream.duplicates} declared={stream.evicted_count} lost={lost}"
    )
    return lost


async def settled(
    agent: AgentProcess, verify: VerifyProcess, epoch: str, timeout: float = 40
) -> int:
    """With the sources quiet: wait until the agent's last seq has not moved for a second (the
    batcher's delay and a restarted source's first poll are behind us), its buffer is empty,
    and the consumer's state holds up to that seq. Returns the seq (readings taken)."""
    last = [-1, 0.0]

    def done() -> bool:
        status = agent.status()
        seq = int(status["buffer"]["next_seq"]) - 1
        now = time.monotonic()
        if seq != last[0]:
            last[:] = [seq, now]
            return False
        quiet = now - last[1] >= 1.0
        return quiet and status["buffer"]["batches"] == 0 and verify.stream(epoch).max_seq == seq

    await wait_for(done, timeout, "the buffer to drain and the consumer to hold the last seq")
    return int(last[0])


@contextmanager
def verify_processes() -> Iterator[Callable[[VerifyProcess], VerifyProcess]]:
    """Registers VerifyProcess objects; any still running at the end is killed (a failing test
    never leaves one behind)."""
    started: list[VerifyProcess] = []

    def register(verify: VerifyProcess) -> VerifyProcess:
        started.append(verify)
        return verify

    try:
        yield register
    finally:
        for verify in started:
            if verify.process is not None:
                verify.process.kill()
                verify.process.wait()
