"""Reads a small YAML file of plain data (a trust file, ingest settings): bounded, no aliases.

Bounded in what a file may cost before its content is judged: at most MAX_YAML_FILE_BYTES read
(a device or a runaway file is not read to its end), no aliases (a few hundred bytes of nested
aliases expand to hundreds of MB once printed or walked), nesting at most MAX_DEPTH levels
(deeper, PyYAML's composer fails with RecursionError). Each refusal is a ValueError naming the
file. The agent's own configuration has a loader of its own (edge_agent.config.loader), which
also locates every problem by line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import Node

MAX_YAML_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
"""Levels of mappings and lists; a trust file needs three."""


def read_yaml_file(path: Path, kind: str = "YAML") -> Any:
    """The plain data of the YAML file at `path` (None when it holds no document).

    Raises OSError when it cannot be read; ValueError `{path}: larger than 1 MiB`, or
    `{path}: not {kind}: {why}` for text that is not UTF-8, not YAML, has an alias or nests
    deeper than MAX_DEPTH.
    """
    with path.open("rb") as handle:
        data = handle.read(MAX_YAML_FILE_BYTES + 1)
    if len(data) > MAX_YAML_FILE_BYTES:
        raise ValueError(f"{path}: larger than 1 MiB")
    try:
        # _PlainLoader is a SafeLoader (plain data only): not the unsafe load ruff and bandit flag.
        return yaml.load(data.decode("utf-8"), Loader=_PlainLoader)  # noqa: S506  # nosec B506
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not {kind}: {exc}") from None


class _PlainLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (the pure-Python one: its composer can be checked as it goes), refusing
    an alias or a node deeper than MAX_DEPTH before composing it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            raise ComposerError(None, None, "aliases (*name) are not allowed", mark)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
