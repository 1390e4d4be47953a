"""Field types shared by the configuration models: durations, sizes, names, secrets."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from edge_agent.secret_file import read_secret_file

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> object:
    """Accept `500ms`, `1s`, `5m`, `2h`, `7d` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 1s, 5m, 2h or 7d")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m, h or d (e.g. 500ms)")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, allow_inf_nan=False)]
"""A positive duration, in seconds once parsed."""

Finite = Annotated[float, Field(allow_inf_nan=False)]
"""A number that is not NaN or infinite: scales and offsets that go into readings."""

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
NAME_RULE = f"String should match pattern '{NAME_PATTERN}'"
"""The message pydantic gives for a `Name` that breaks the pattern, for validators that check it."""

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
"""Identifiers that end up in topics, metrics labels and the wire format."""


class StrictModel(BaseModel):
    """Every configuration model: unknown keys are errors, values are not coerced silently.

    Validators are built on first validation (`defer_build`), not at import: the agent is handed
    its config validated by a child process (edge_agent/config/isolated.py) and does not
    validate one itself, which saves it about 0.8 MB.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


Loc = tuple[str | int, ...]
"""A key path into the configuration: ("sources", 2, "points", 0, "type")."""

Problem = tuple[Loc, str]
"""A cross-field problem: where it is and what is wrong."""


def duplicate_problems(values: Sequence[str], list_key: str, field: str) -> list[Problem]:
    """One problem per repeated value in a list, at the repeat, naming the first occurrence."""
    first: dict[str, int] = {}
    found: list[Problem] = []
    for index, value in enumerate(values):
        if value in first:
            found.append(((list_key, index, field), f"duplicate {field} {value!r} "
                          f"(also {list_key}[{first[value]}])"))  # fmt: skip
        else:
            first[value] = index
    return found


def read_secret(inline: SecretStr | None, file: Path | None) -> str | None:
    """The secret from `x` or `x_file`; a file's trailing newline is not part of the secret."""
    if file is not None:
        return read_secret_file(file)
    return inline.get_secret_value() if inline is not None else None
