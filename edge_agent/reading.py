"""The value types that flow from sources to the batcher."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

Value = float | int | bool | str | None


class Quality(StrEnum):
    """docs/contract.md §4 quality of one reading."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Reading(NamedTuple):
    """One sampled value of one point; a NamedTuple because millions are made per minute."""

    src: str
    pt: str
    ts_ns: int
    value: Value
    quality: Quality
    code: int | None = None
    """The device's own status code where it has one (OPC UA StatusCode); sent as `sc`."""
