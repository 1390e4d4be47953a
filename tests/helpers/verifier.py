"""The consumer side of the end-to-end tests: a running verifier, and `edge-agent status`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.envelope import Opener
from edge_agent.seal.keys import load_public_key
from helpers.agent import AgentProcess
from helpers.wait import deadline


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
