"""Loads one YAML file into a validated Config, reporting every problem with its line.

PyYAML's nodes carry positions and pydantic's errors carry key paths; this module joins the two,
which no library does. Aliases are refused outright (a small alias bomb passes `safe_load` quickly
and then costs seconds and hundreds of MB), and so are files over 1 MiB.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edge_agent.config.schema import Config
from edge_agent.errors import ConfigError, ConfigProblem

MAX_CONFIG_BYTES = 1024 * 1024
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Loc = tuple[str | int, ...]
Marks = dict[Loc, tuple[int, int]]

_SCALARS = yaml.SafeLoader("")  # its constructor turns resolved scalar nodes into Python values


class _NoAliasLoader(yaml.SafeLoader):
    """A SafeLoader that refuses aliases, so no document can expand beyond its own size."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML aliases (*name) are not allowed in edge-agent configuration",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def load_config(path: Path, *, check_files: bool = True) -> Config:
    """Read, expand and validate `path`; raise ConfigError listing every problem found.

    OSError propagates when the file cannot be read at all (check-config exits 2 for it).
    """
    name = str(path)
    if not path.is_file():  # a directory, a FIFO or a device would hang or mislead
        raise IsADirectoryError(errno.EISDIR if path.is_dir() else errno.EINVAL,
                                "not a regular file", name)  # fmt: skip
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(name, [ConfigProblem("", "file is larger than 1 MiB")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            name,
            [
                ConfigProblem(
                    "", f"not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})"
                )
            ],
        ) from None
    return parse_config(text, name, check_files=check_files)


def parse_config(text: str, name: str = "<config>", *, check_files: bool = False) -> Config:
    """Validate YAML text; the pure half of `load_config`, for tests and the embedded demo."""
    marks: Marks = {}
    problems: list[ConfigProblem] = []
    try:
        node = yaml.compose(text, Loader=_NoAliasLoader)
        if node is None:
            raise ConfigError(name, [ConfigProblem("", "the file is empty", 1, 1)])
        data = _build(node, (), marks, problems)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ConfigError(name, [ConfigProblem("", message, line, col)]) from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        raise ConfigError(name, [ConfigProblem("", " ".join(str(exc).split()))]) from None
    except RecursionError:
        raise ConfigError(name, [ConfigProblem("", "nested too deeply")]) from None
    if not isinstance(data, dict):
        raise ConfigError(name, [ConfigProblem("", "the top level must be a mapping", 1, 1)])

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        already = {p.path for p in problems}  # e.g. an unset ${VAR}: don't report it twice
        for err in exc.errors(include_url=False):
            problem = _locate(_clean_loc(err["loc"], data), err["msg"], marks)
            if problem.path not in already:
                problems.append(problem)
        raise ConfigError(name, _sorted(problems)) from None

    problems.extend(_locate(loc, msg, marks) for loc, msg in config.problems())
    if check_files:
        for loc, file in config.files_to_check():
            try:
                found = file.is_file()
            except PermissionError:  # a directory on the way that this user may not search
                problems.append(_locate(loc, f"file not readable: {file}", marks))
                continue
            if not found:
                problems.append(_locate(loc, f"file not found: {file}", marks))
            elif not os.access(file, os.R_OK):
                problems.append(_locate(loc, f"file not readable: {file}", marks))
    if problems:
        raise ConfigError(name, _sorted(problems))
    return config


def _build(node: yaml.Node, loc: Loc, marks: Marks, problems: list[ConfigProblem]) -> Any:
    """Turn a node tree into plain data, recording where each value starts."""
    marks[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(ConfigProblem(_dotted(loc), "keys must be plain text", line, col))
                continue
            key = key_node.value
            if key in result:
                problems.append(ConfigProblem(_dotted((*loc, key)), "duplicate key", line, col))
            result[key] = _build(value_node, (*loc, key), marks, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*loc, i), marks, problems) for i, item in enumerate(node.value)]
    try:
        value = _SCALARS.construct_object(node)
    except (yaml.YAMLError, ValueError) as exc:  # `!!int abc`, `!custom x`, a 5000-digit int
        line, col = marks[loc]
        reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else exc
        problems.append(ConfigProblem(_dotted(loc), f"invalid value: {reason}", line, col))
        return None
    finally:
        _SCALARS.constructed_objects.clear()
    if isinstance(value, str):
        value = _expand_env(value, loc, marks, problems)
    return value


def _expand_env(value: str, loc: Loc, marks: Marks, problems: list[ConfigProblem]) -> str:
    """Replace `${NAME}` (or `${NAME:-default}`) with the environment's value."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        line, col = marks[loc]
        problems.append(
            ConfigProblem(
                _dotted(loc),
                f"environment variable {name} is not set",
                line,
                col,
            )
        )
        return match.group(0)

    return _ENV_REF.sub(substitute, value)


def _clean_loc(loc: tuple[str | int, ...], data: Any) -> Loc:
    """Drop the union tags pydantic inserts (`sources.0.modbus.points`) by walking the data."""
    cleaned: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part not in current and current.get("type") == part:
            continue
        cleaned.append(part)
        if isinstance(current, dict):
            current = current.get(part)
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            current = current[part]
        else:
            current = None
    return tuple(cleaned)


def _locate(loc: Loc, message: str, marks: Marks) -> ConfigProblem:
    """Attach the position of the value at `loc`, else of its closest ancestor in the file."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in marks:
            line, col = marks[loc[:end]]
            return ConfigProblem(_dotted(loc), _reword(message), line, col)
    return ConfigProblem(_dotted(loc), _reword(message))


def _reword(message: str) -> str:
    """Pydantic's phrasing, made to read as advice to someone editing YAML."""
    if message == "Extra inputs are not permitted":
        return "unknown key"
    if message == "Field required":
        return "required key is missing"
    return message.removeprefix("Value error, ")


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _sorted(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.column or 0, p.path))
