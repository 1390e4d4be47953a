"""Bounded waits: every wait in the tests has a deadline and says what it was waiting for.

Await an event where one exists (inside `deadline`); poll with `wait_for` only for a state that
nothing announces, such as a real process's HTTP status or a failed connection attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable


async def wait_for(
    condition: Callable[[], object], timeout: float, what: str, *, interval: float = 0.05
) -> None:
    """Poll the cheap, synchronous `condition` every `interval` s until it is truthy.

    Raises TimeoutError naming `what` once `timeout` seconds have passed. An exception the
    condition raises propagates at once.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() >= end:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def deadline(timeout: float, what: str) -> AsyncIterator[None]:
    """Bound every await in the block; on expiry raise TimeoutError naming `what`.

    A TimeoutError raised inside the block for another reason passes through unchanged.
    """
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            yield
    except TimeoutError:
        if scope.expired():
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}") from None
        raise


def describe(predicate: Callable[..., object]) -> str:
    """The source text of a predicate (usually a lambda), for a timeout message."""
    try:
        return " ".join(inspect.getsource(predicate).split())
    except (OSError, TypeError):
        return repr(predicate)
