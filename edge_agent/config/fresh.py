"""Fresh copies of validated config values, made once the configuration as read is freed.

Python's small-object allocator returns a 1 MiB arena to the system only when nothing in it is
left. The values a running agent keeps of its configuration (a source's host, name, timeouts)
were made while the file was read and validated, scattered among far larger transient
structures, and each keeps its arena resident: 6-7 arenas at 10 x 1,000 points
(docs/performance.md). Equal copies made after the transient structures are freed go where
the agent's other long-lived objects are, and those arenas can go.
"""

from __future__ import annotations

import marshal
from pathlib import PurePath
from typing import Any, TypeVar

from pydantic import BaseModel

T = TypeVar("T")

_PLAIN = (str, int, float, bytes, tuple, frozenset)
"""Immutable values marshal copies (with their items, when they are plain too)."""


def fresh_copy(value: T) -> T:
    """An equal copy of `value` made of new objects where it can be.

    Pydantic models are copied field by field (no validation: the values are already valid);
    text, numbers, bytes and tuples of them through a marshal round trip; lists and dicts
    item by item; paths from their text. Anything else (an enum member, a secret) is kept as is.
    Never raises for a value a validated config holds.
    """
    return _fresh(value)  # type: ignore[no-any-return]


def _fresh(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, BaseModel):
        update = {name: _fresh(getattr(value, name)) for name in type(value).model_fields}
        return value.model_copy(update=update)
    if type(value) in _PLAIN:
        try:
            return marshal.loads(marshal.dumps(value))  # noqa: S302  # nosec B302  # our bytes
        except ValueError:  # a tuple holding something marshal does not know
            return value
    if type(value) is list:
        return [_fresh(v) for v in value]
    if type(value) is dict:
        return {_fresh(k): _fresh(v) for k, v in value.items()}
    if isinstance(value, PurePath):
        return type(value)(str(value))
    return value
