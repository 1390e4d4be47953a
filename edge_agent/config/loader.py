"""Loads one YAML file into a validated Config, reporting every problem with its line.

PyYAML's events carry positions and pydantic's errors carry key paths; this module joins the two,
which no library does. The file is read as a stream of parser events (libyaml's parser when
PyYAML has it, about ten times faster than the pure-Python one) straight into plain data and a
table of positions, without building PyYAML's node tree.

What a file may make the agent build is bounded: aliases are refused outright (a small alias
bomb passes `safe_load` quickly and then costs seconds and hundreds of MB), so are files over
MAX_CONFIG_BYTES, nesting deeper than MAX_DEPTH, and more than MAX_POINTS points, counted
before any block is expanded (edge_agent.config.blocks).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edge_agent.config.blocks import MAX_POINTS, declared_points, path_text
from edge_agent.config.schema import Config
from edge_agent.errors import ConfigError, ConfigProblem

MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""4 MiB: 50,000 points written one per line fit (about 3.5 MB); a runaway file does not."""
MAX_DEPTH = 64
"""Nesting levels of mappings and lists; a configuration needs six."""
MAX_NODES = 1_000_000
"""Keys and values in a file: 50,000 points written out with eight keys each take 850,000.
A file of nothing but tiny values (`[0,0,0,...]`) reaches the limit at 2 MB."""
MAX_FLOW_NESTING = 100
"""`[` and `{` nested deeper than this are refused before parsing: PyYAML's scanner takes time
quadratic in flow nesting (see `_flow_nesting_line`)."""

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]{0,17})\Z")
"""Decimal integers that PyYAML's constructor turns into int(text): a fast path."""
_PLAIN_FLOAT = re.compile(r"[-+]?(?:0|[1-9][0-9]{0,14})\.[0-9]{1,15}\Z")
"""Decimals that PyYAML's constructor turns into float(text): a fast path."""
_PARSER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML was built with it; the same events either way."""

Loc = tuple[str | int, ...]
Marks = dict[Loc, int]
"""Where each value starts: `line << 32 | column` (1-based), one int per value."""

_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})
"""The only tags a mapping or a list may carry (implicitly, or written `!!map` / `!!seq`)."""

_SCALARS = yaml.SafeLoader("")  # resolves a scalar's tag and constructs its Python value


def load_config(path: Path, *, check_files: bool = True) -> Config:
    """Read, expand and validate `path`; raise ConfigError listing every problem found.

    OSError propagates when the file cannot be read at all (check-config exits 2 for it).
    """
    name = str(path)
    info = path.stat()  # a missing file: FileNotFoundError, "No such file or directory"
    if not stat.S_ISREG(info.st_mode):  # a directory, a FIFO or a device would hang or mislead
        raise IsADirectoryError(errno.EISDIR if stat.S_ISDIR(info.st_mode) else errno.EINVAL,
                                "not a regular file", name)  # fmt: skip
    size = info.st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(name, [ConfigProblem(
            "", f"file is larger than {MAX_CONFIG_BYTES // 1024**2} MiB ({size:,} bytes): "
            "write runs of registers as blocks (count), see docs/modbus.md")])  # fmt: skip
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
    deep = _flow_nesting_line(text)
    if deep is not None:
        message = f"nested too deeply (more than {MAX_FLOW_NESTING} levels of [ and {{)"
        raise ConfigError(name, [ConfigProblem("", message, deep, 1)])
    try:
        data = _read(text, None, problems)
    except yaml.MarkedYAMLError as exc:
        mark: Any = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        if "maximum nesting depth" in message:  # libyaml's own limit (1000 levels)
            message = f"nested too deeply (more than {MAX_DEPTH} levels)"
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ConfigError(name, [ConfigProblem("", message, line, col)]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line, col = _position(text, exc.position)
        message = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise ConfigError(name, [ConfigProblem("", message, line, col)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, [ConfigProblem("", " ".join(str(exc).split()))]) from None
    if data is _EMPTY:
        raise ConfigError(name, [ConfigProblem("", "the file is empty", 1, 1)])
    if not isinstance(data, dict):
        raise ConfigError(name, [ConfigProblem("", "the top level must be a mapping", 1, 1)])
    declared = list(declared_points(data))
    if declared and declared[-1][1] > MAX_POINTS:  # refused before any block is expanded
        loc = next(loc for loc, total in declared if total > MAX_POINTS)
        message = (f"{declared[-1][1]:,} points in all, more than the {MAX_POINTS:,} one "
                   "configuration may have (this entry passes the limit)")  # fmt: skip
        raise ConfigError(name, [_locate(loc, message, _marks(text))])

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        already = {p.path for p in problems}  # e.g. an unset ${VAR}: don't report it twice
        marks = _marks(text)
        for err in exc.errors(include_url=False):
            problem = _locate(_clean_loc(err["loc"], data), err["msg"], marks)
            if problem.path not in already:
                problems.append(problem)
        raise ConfigError(name, _sorted(problems)) from None

    found = list(config.problems())
    if check_files:
        found += _file_problems(config)
        found += _signing_key_problems(config)
        found += _ack_key_problems(config)
    if found:
        marks = _marks(text)
        problems.extend(_locate(loc, message, marks) for loc, message in found)
    if problems:
        raise ConfigError(name, _sorted(problems))
    return config


def _marks(text: str) -> Marks:
    """Where each value of `text` starts, for locating problems: `text` read again.

    Only a file with problems needs them: keeping a mark per value while reading cost about
    1 KB a point at the peak of loading a large gateway (docs/performance.md). `text` was read
    once without error, so reading it again gives the same data and raises nothing.
    """
    marks: Marks = {}
    _read(text, marks, [])
    return marks


def _file_problems(config: Config) -> list[tuple[Loc, str]]:
    """The files the config names (keys, certificates, secrets) that are missing or unreadable."""
    problems: list[tuple[Loc, str]] = []
    for loc, file in config.files_to_check():
        try:
            found = file.is_file()
        except PermissionError:  # a directory on the way that this user may not search
            problems.append((loc, f"file not readable: {file}"))
            continue
        if not found:
            problems.append((loc, f"file not found: {file}"))
        elif not os.access(file, os.R_OK):
            problems.append((loc, f"file not readable: {file}"))
    return problems


def _flow_nesting_line(text: str) -> int | None:
    """The line where `[` and `{` nest deeper than MAX_FLOW_NESTING, else None.

    PyYAML's scanner takes time quadratic in the flow nesting (200,000 `[` cost seconds before
    its recursion fails), so such a file is refused before it is parsed. Brackets inside
    quoted text are counted too: a real file is nowhere near the limit either way.
    """
    if text.count("[") + text.count("{") <= MAX_FLOW_NESTING:
        return None
    depth = 0
    for index, char in enumerate(text):
        if char in "[{":
            depth += 1
            if depth > MAX_FLOW_NESTING:
                return text.count("\n", 0, index) + 1
        elif char in "]}":
            depth = max(0, depth - 1)
    return None


def _signing_key_problems(config: Config) -> list[tuple[Loc, str]]:
    """The checks `run` makes of the signing key file, so that check-config says the same."""
    from edge_agent.seal.keys import key_file_problems  # noqa: PLC0415 - only with files

    path = config.signing.key_file
    try:
        if not path.is_file():
            return []  # reported above as not found
        found = key_file_problems(path)
    except PermissionError:  # a directory on the way this user may not search
        return []  # reported above as not readable (`_file_problems`)
    except OSError as exc:
        found = [f"cannot examine {path}: {exc.strerror or exc}"]
    return [(("signing", "key_file"), message) for message in found]


def _ack_key_problems(config: Config) -> list[tuple[Loc, str]]:
    """Each `mqtt.ack_keys` file must be an Ed25519 public key (a private key is refused)."""
    from edge_agent.seal.keys import load_consumer_key  # noqa: PLC0415 - only with files

    problems: list[tuple[Loc, str]] = []
    for index, path in enumerate(config.mqtt.ack_keys):
        try:
            if not path.is_file() or not os.access(path, os.R_OK):
                continue  # reported above as not found or not readable
            load_consumer_key(path)
        except (OSError, ValueError) as exc:
            problems.append((("mqtt", "ack_keys", index), str(exc)))
    return problems


_EMPTY = object()
"""What `_read` returns for a file with no document at all."""


class _Collection:
    """A mapping or list being read: its value, where it is, and (mapping) the pending key."""

    __slots__ = ("key", "loc", "value")

    def __init__(self, value: dict[str, Any] | list[Any], loc: Loc) -> None:
        self.value = value
        self.loc = loc
        self.key: str | None = None


def _read(text: str, marks: Marks | None, problems: list[ConfigProblem]) -> Any:
    """Parse `text` into plain data, recording in `marks` (if given) where each value starts.

    Problems that leave the rest readable (a duplicate key, a value that is not valid for its
    tag, an unset environment variable) go to `problems`; the others raise: yaml.YAMLError for
    syntax, an alias, a second document or nesting beyond MAX_DEPTH.
    """
    parser = _PARSER(text)
    try:
        parser.get_event()  # stream start
        if parser.check_event(yaml.StreamEndEvent):
            return _EMPTY
        parser.get_event()  # document start
        data = _read_document(parser, marks, problems)
        parser.get_event()  # document end
        if not parser.check_event(yaml.StreamEndEvent):
            raise _error(parser.get_event(), "expected a single document in the stream, but "
                         "found another document")  # fmt: skip
        return data
    finally:
        parser.dispose()


def _read_document(parser: Any, marks: Marks | None, problems: list[ConfigProblem]) -> Any:
    """The value of one document, read iteratively (no recursion, however deep the file)."""
    stack: list[_Collection] = []
    nodes = 0
    while True:
        event: Any = parser.get_event()
        nodes += 1
        if nodes > MAX_NODES:
            raise _error(event, f"more than {MAX_NODES:,} keys and values in one file")
        top = stack[-1] if stack else None
        if isinstance(event, _ENDS):
            assert top is not None
            stack.pop()
            if not stack:
                return top.value
            _store(stack[-1], top.value)
            continue
        if top is not None and top.key is None and isinstance(top.value, dict):
            if isinstance(event, yaml.ScalarEvent):  # a key: taken as written, no tag applied
                top.key = event.value
                if event.value in top.value:
                    path = path_text((*top.loc, event.value))
                    problems.append(ConfigProblem(path, "duplicate key", *_unpack(_at(event))))
                continue
            _refuse_alias(event)
            problems.append(ConfigProblem(path_text(top.loc), "keys must be plain text",
                                          *_unpack(_at(event))))  # fmt: skip
            _skip(parser, event)  # the key
            _skip(parser, parser.get_event())  # and its value
            continue
        loc = _child_loc(top)
        if marks is not None:
            marks[loc] = _at(event)
        if isinstance(event, yaml.ScalarEvent):
            value = _scalar(event, loc, problems)
            if top is None:
                return value
            _store(top, value)
        elif isinstance(event, _STARTS):
            if _refused_tag(parser, event, loc, problems):
                if top is None:
                    return None
                _store(top, None)
                continue
            if len(stack) >= MAX_DEPTH:
                raise _error(event, f"nested too deeply (more than {MAX_DEPTH} levels)")
            empty: dict[str, Any] | list[Any] = (
                {} if isinstance(event, yaml.MappingStartEvent) else []
            )
            stack.append(_Collection(empty, loc))
        else:
            _refuse_alias(event)
            raise _error(event, f"unexpected {event}")


def _child_loc(top: _Collection | None) -> Loc:
    """Where the next value read goes: in `top` (a mapping's pending key, or a list's end)."""
    if top is None:
        return ()
    if top.key is not None:
        return (*top.loc, top.key)
    return (*top.loc, len(top.value))


_STARTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_ENDS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _at(event: Any) -> int:
    """Where an event starts, packed as in Marks."""
    mark = event.start_mark
    return int(mark.line + 1) << 32 | int(mark.column + 1)


def _unpack(mark: int) -> tuple[int, int]:
    """1-based (line, column) of a packed mark."""
    return mark >> 32, mark & 0xFFFFFFFF


def _store(collection: _Collection, value: Any) -> None:
    if isinstance(collection.value, dict):
        assert collection.key is not None
        collection.value[collection.key] = value
        collection.key = None
    else:
        collection.value.append(value)


def _refuse_alias(event: Any) -> None:
    if isinstance(event, yaml.AliasEvent):
        raise _error(event, "YAML aliases (*name) are not allowed in edge-agent configuration")


def _error(event: Any, problem: str) -> yaml.MarkedYAMLError:
    """A problem located where `event` starts, reported like the parser's own errors."""
    mark: Any = event.start_mark
    return yaml.composer.ComposerError(None, None, problem, mark)


def _refused_tag(parser: Any, event: Any, loc: Loc, problems: list[ConfigProblem]) -> bool:
    """True, with a problem recorded and the node skipped, when a mapping or list carries a tag
    other than its own.

    `!!python/object/apply:os.system [id]` is a tagged list: never constructed, but reading it
    as a plain list would hide what the file asked for.
    """
    if event.tag is None or event.tag in _PLAIN_TAGS or event.tag == "!":
        return False
    tag = event.tag.replace("tag:yaml.org,2002:", "!!", 1)
    problems.append(ConfigProblem(path_text(loc), f"invalid value: tag {tag} is not allowed",
                                  *_unpack(_at(event))))  # fmt: skip
    _skip(parser, event)
    return True


def _skip(parser: Any, event: Any) -> None:
    """Consume the rest of the node that `event` starts (aliases inside it still refused)."""
    depth = 0
    while True:
        _refuse_alias(event)
        if isinstance(event, _STARTS):
            depth += 1
        elif isinstance(event, _ENDS):
            depth -= 1
        if depth == 0:
            return
        event = parser.get_event()


def _scalar(event: Any, loc: Loc, problems: list[ConfigProblem]) -> Any:
    """A scalar's Python value, by the YAML 1.1 rules of PyYAML's SafeLoader."""
    tag = event.tag
    if tag is None or tag == "!":
        tag = _SCALARS.resolve(yaml.ScalarNode, event.value, event.implicit)  # type: ignore[no-untyped-call]
    text = event.value
    if tag == _STR_TAG:
        value = text
    elif tag == _INT_TAG and _PLAIN_INT.match(text):
        value = int(text)
    elif tag == _FLOAT_TAG and _PLAIN_FLOAT.match(text):
        value = float(text)
    else:
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            value = _SCALARS.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:  # `!!int abc`, `!custom x`, a 5000-digit int
            line, col = _unpack(_at(event))
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else exc
            problems.append(ConfigProblem(path_text(loc), f"invalid value: {reason}", line, col))
            return None
        finally:
            _SCALARS.constructed_objects.clear()
    if isinstance(value, str) and "${" in value:
        value = _expand_env(value, loc, _at(event), problems)
    return value


def _position(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of character `offset` of `text`."""
    line = text.count("\n", 0, offset)
    return line + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _expand_env(value: str, loc: Loc, at: int, problems: list[ConfigProblem]) -> str:
    """Replace `${NAME}` (or `${NAME:-default}`) with the environment's value."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        line, col = _unpack(at)
        problems.append(
            ConfigProblem(
                path_text(loc),
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
    """Attach the position of the value at `loc`, else of its closest ancestor in the file.

    A point of a block (`points[3][57].name`) is not in the file: it is located at what its
    entry says (`points[3].name`), the index in the block dropped.
    """
    in_file = tuple(
        part
        for i, part in enumerate(loc)
        if not (isinstance(part, int) and i > 0 and isinstance(loc[i - 1], int))
    )
    for end in range(len(in_file), -1, -1):
        if in_file[:end] in marks:
            line, col = _unpack(marks[in_file[:end]])
            return ConfigProblem(path_text(loc), _reword(message), line, col)
    return ConfigProblem(path_text(loc), _reword(message))


def _reword(message: str) -> str:
    """Pydantic's phrasing, made to read as advice to someone editing YAML."""
    if message == "Extra inputs are not permitted":
        return "unknown key"
    if message == "Field required":
        return "required key is missing"
    return message.removeprefix("Value error, ")


def _sorted(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.column or 0, p.path))
