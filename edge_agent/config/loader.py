"""Loads one YAML file into a validated Config, reporting every problem with its line.

PyYAML's events carry positions and pydantic's errors carry key paths; this module joins the two,
which no library does. Aliases are refused outright (a small alias bomb passes `safe_load` quickly
and then costs seconds and hundreds of MB), and so are files over 1 MiB.

The data is built straight from the parser's events, one at a time: PyYAML's node tree (about 80
bytes of objects per byte of YAML, 50 MB for a 640 KB file of 10,000 points) is never built, and
the positions of values are collected only when there is a problem to place (a second pass). What
loading needs is then freed; it would otherwise stay as the agent's resident memory for good.
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
ALIAS_REFUSED = "YAML aliases (*name) are not allowed in edge-agent configuration"


class _Walk:
    """Plain data from the YAML events of one document, refusing aliases.

    Problems that belong to a value (a duplicate key, a key that is not text, a scalar that
    cannot be constructed, an unset environment variable) go to `problems` with their position;
    `marks`, when given, receives the position of every value by key path. YAML errors raise
    yaml.MarkedYAMLError, with PyYAML's own messages (the parser is PyYAML's).
    """

    def __init__(self, text: str, problems: list[ConfigProblem], marks: Marks | None) -> None:
        self._loader: Any = yaml.SafeLoader(text)  # its parser's methods are untyped
        self._problems = problems
        self._marks = marks
        self._strings: dict[str, str] = {}
        """One object per distinct text while loading: `holding`, `uint16`, `big` repeat on every
        point (the validated models share the config's Literal values anyway)."""

    def document(self) -> tuple[bool, Any]:
        """(False, None) for a stream without a document, else (True, the document's data)."""
        loader = self._loader
        try:
            loader.get_event()  # stream start
            if loader.check_event(yaml.StreamEndEvent):
                return False, None
            loader.get_event()  # document start
            root = loader.peek_event()
            data = self._value(())
            loader.get_event()  # document end
            if not loader.check_event(yaml.StreamEndEvent):
                event = loader.get_event()
                raise yaml.composer.ComposerError(
                    "expected a single document in the stream", root.start_mark,
                    "but found another document", event.start_mark,
                )  # fmt: skip
            return True, data
        finally:
            loader.dispose()

    def _value(self, loc: Loc) -> Any:
        loader = self._loader
        event = loader.get_event()
        mark: Any = event.start_mark
        position = (mark.line + 1, mark.column + 1)
        if self._marks is not None:
            self._marks[loc] = position
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, ALIAS_REFUSED, mark)
        if isinstance(event, yaml.ScalarEvent):
            return self._scalar(event, loc, position)
        if isinstance(event, yaml.SequenceStartEvent):
            items: list[Any] = []
            while not loader.check_event(yaml.SequenceEndEvent):
                items.append(self._value((*loc, len(items))))
            loader.get_event()
            return items
        result: dict[Any, Any] = {}  # a mapping
        while not loader.check_event(yaml.MappingEndEvent):
            key_event = loader.peek_event()
            line, col = key_event.start_mark.line + 1, key_event.start_mark.column + 1
            if not isinstance(key_event, yaml.ScalarEvent):
                self._problems.append(ConfigProblem(_dotted(loc), "keys must be plain text",
                                                    line, col))  # fmt: skip
                self._skip()
                self._skip()
                continue
            loader.get_event()
            key = self._shared(key_event.value)  # the same few keys, thousands of times
            if key in result:
                self._problems.append(
                    ConfigProblem(_dotted((*loc, key)), "duplicate key", line, col)
                )
            result[key] = self._value((*loc, key))
        loader.get_event()
        return result

    def _skip(self) -> None:
        """Consume one node's events (still refusing aliases)."""
        depth = 0
        while True:
            event = self._loader.get_event()
            mark: Any = event.start_mark
            if isinstance(event, yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, ALIAS_REFUSED, mark)
            if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                depth += 1
            elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                depth -= 1
            if depth == 0:
                return

    def _scalar(self, event: Any, loc: Loc, position: tuple[int, int]) -> Any:
        """The scalar's value, as PyYAML's safe constructor makes it; env references expanded."""
        tag = event.tag
        if tag is None or tag == "!":  # as PyYAML's composer resolves it
            tag = self._loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            value = _SCALARS.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:  # `!!int abc`, `!custom x`, a 5000-digit int
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else exc
            self._problems.append(
                ConfigProblem(_dotted(loc), f"invalid value: {reason}", *position)
            )
            return None
        finally:
            _SCALARS.constructed_objects.clear()
        if isinstance(value, str):
            value = self._shared(_expand_env(value, loc, position, self._problems))
        return value

    def _shared(self, text: str) -> str:
        return self._strings.setdefault(text, text)


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
    problems: list[ConfigProblem] = []
    try:
        found, data = _Walk(text, problems, None).document()
        if not found:
            raise ConfigError(name, [ConfigProblem("", "the file is empty", 1, 1)])
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

    marks: Marks = {}

    def located(loc: Loc, message: str) -> ConfigProblem:
        if not marks:  # positions are wanted only for problems: a second pass finds them
            _Walk(text, [], marks).document()
        return _locate(loc, message, marks)

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        already = {p.path for p in problems}  # e.g. an unset ${VAR}: don't report it twice
        for err in exc.errors(include_url=False):
            problem = located(_clean_loc(err["loc"], data), err["msg"])
            if problem.path not in already:
                problems.append(problem)
        raise ConfigError(name, _sorted(problems)) from None
    del data  # validated: the plain data is not needed any more

    problems.extend(located(loc, msg) for loc, msg in config.problems())
    if check_files:
        for loc, file in config.files_to_check():
            if not file.is_file():
                problems.append(located(loc, f"file not found: {file}"))
            elif not os.access(file, os.R_OK):
                problems.append(located(loc, f"file not readable: {file}"))
    if problems:
        raise ConfigError(name, _sorted(problems))
    return config


def _expand_env(
    value: str, loc: Loc, position: tuple[int, int], problems: list[ConfigProblem]
) -> str:
    """Replace `${NAME}` (or `${NAME:-default}`) with the environment's value."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        line, col = position
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
