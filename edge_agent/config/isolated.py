"""`load_config` in a child process: the memory of reading and validating stays there.

Reading a configuration (the YAML data, pydantic's validation and its temporaries) takes far
more memory than what the agent keeps of it, and CPython's small-object allocator returns a
1 MiB arena to the system only once nothing in it is left: a few surviving objects keep the
arenas of loading resident for the process's whole life (about 9 MB at 10 x 1,000 points, the
whole per-point slope of the agent's RSS; docs/performance.md, issue 10). Here a child process
(forked at start-up; a fresh interpreter for a reload, when the agent runs threads) reads and
validates the file, makes of the validated `Config` what its caller will keep (`prepare`: the
points of each source by column instead of a model each) and hands that back pickled; the
child's memory goes with it when it exits. Unpickling does not validate again: pydantic
restores a model's fields as they were. The pickle comes from our own child over a pipe that
only the two processes hold (never stdout, which anything the child runs may print to).

The outcome is the one loading in process gives: `prepare(load_config(path))`, the same
`ConfigError` (file name and located problems) or the same `OSError`. Where there is no `fork`
(not POSIX), or the child fails in any other way (killed, a bug, a result that does not pickle),
the file is loaded in process, so the caller sees exactly what it saw before, an unexpected
exception included. An exception that interrupts the wait (KeyboardInterrupt, or what a caller's
SIGTERM handler raises) ends the child first: it never outlives the wait for it; on Linux the
kernel ends it too if the parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle  # nosec B403 - our own child's bytes, over a pipe only it and we hold
import signal
import subprocess  # nosec B404 - our own interpreter, a fixed command
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.config.schema import Config
from edge_agent.errors import ConfigError, ConfigProblem

log = logging.getLogger(__name__)

T = TypeVar("T")

_FAILED = 70
"""The child's exit status when it could not hand back an outcome (EX_SOFTWARE)."""

_PR_SET_PDEATHSIG = 1
"""prctl(2): the signal the calling process gets when its parent dies (Linux)."""

_STOPS = {signal.SIGINT, signal.SIGTERM}
"""The signals a caller may turn into an exception (a stop) while it waits for the child."""


def load_config_isolated(
    path: Path, prepare: Callable[[Config], T], *, fresh_interpreter: bool = False
) -> T:
    """`prepare(load_config(path))`, read, validated and prepared in a child process.

    Raises ConfigError (every problem, located) or OSError (the file cannot be read) as
    `load_config` does. `prepare` must return something that pickles.

    The child is forked (cheap: it has every module already) unless `fresh_interpreter`, which
    a process that runs threads must ask for: a forked child has only the calling thread, and a
    lock another thread held at the fork (in OpenSSL, say) would stay held in the child. A fresh
    interpreter (`python -m edge_agent.config.isolated`) imports what it needs first (about
    0.5 s) and finds `prepare` by its module and name, so it must be a module-level function or
    a class's method.
    """
    if fresh_interpreter:
        outcome = _in_fresh_interpreter(path, prepare)
    elif hasattr(os, "fork"):
        outcome = _in_child(path, prepare)
    else:
        outcome = None
    if outcome is None:  # no child, or it failed: do it here, whatever that raises
        from edge_agent.config.loader import load_config  # noqa: PLC0415 - see _outcome

        if hasattr(os, "fork") or fresh_interpreter:
            log.warning("Configuration read in process: its child process failed file=%s", path)

        return prepare(load_config(path))
    kind, *rest = outcome
    if kind == "invalid":
        filename, problems = rest
        raise ConfigError(filename, [ConfigProblem(*p) for p in problems])
    if kind == "unreadable":
        error, errno, strerror, filename = rest
        raise error(errno, strerror, filename)
    prepared: T = rest[0]
    return prepared


def _in_child(path: Path, prepare: Callable[[Config], Any]) -> tuple[Any, ...] | None:
    """The child's outcome: `("valid", prepared)`, `("invalid", file, problems)` or
    `("unreadable", OSError or a subclass, errno, strerror, file)`; None when it gave none.

    An exception that interrupts the wait (what a SIGINT or SIGTERM handler raises) kills and
    reaps the child before it goes on: the child never outlives the wait. SIGINT and SIGTERM
    are held from before the fork until the wait is guarded, so none falls in between.
    """
    read_end, write_end = os.pipe()
    parent = os.getpid()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # pragma: no cover - the child (coverage does not follow it); never returns
        _die_with(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.close(read_end)
        _child(path, prepare, write_end)
    try:
        os.close(write_end)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop held meanwhile: raised here
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):  # reaped already
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or not data:
        return None
    return _loads(data)


def _in_fresh_interpreter(path: Path, prepare: Callable[[Config], Any]) -> tuple[Any, ...] | None:
    """`_in_child`'s outcome, from `python -m edge_agent.config.isolated PATH MODULE NAME FD`.

    The outcome comes back on a pipe of its own (FD in the child), not on stdout: what the
    child prints (a library at import, a warning) goes to the agent's stdout and cannot spoil
    it. Its stderr is the agent's too (the journal).
    """
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", __name__, os.fspath(path),
               prepare.__module__, prepare.__qualname__, str(write_end)]  # fmt: skip
    try:
        # our own interpreter and module
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=(write_end,))  # noqa: S603
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    try:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        returncode = child.wait()
    except BaseException:  # as in _in_child: the child never outlives the wait
        child.kill()
        child.wait()
        raise
    if returncode != 0 or not data:
        return None
    return _loads(data)


def _loads(data: bytes) -> tuple[Any, ...] | None:
    try:
        outcome: tuple[Any, ...] = pickle.loads(data)  # noqa: S301  # nosec B301 - see import
    except Exception:  # noqa: BLE001 - bytes that do not load: load in process instead
        return None
    return outcome


def _outcome(path: Path, prepare: Callable[[Config], Any]) -> bytes:
    """The child's work: load and prepare; the outcome pickled. Raises on anything unexpected."""
    # Imported here: the loader and PyYAML (about 1 MB) are the child's, never the parent's
    from edge_agent.config.loader import load_config  # noqa: PLC0415

    outcome: tuple[Any, ...]
    try:
        outcome = ("valid", prepare(load_config(path)))
    except ConfigError as exc:
        problems = [(p.path, p.message, p.line, p.column) for p in exc.problems]
        outcome = ("invalid", exc.filename, problems)
    except OSError as exc:
        if exc.errno is None or type(exc).__module__ != "builtins":
            raise  # not one the parent can remake exactly: it loads in process
        outcome = ("unreadable", type(exc), exc.errno, exc.strerror, exc.filename)
    return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)


def _die_with(parent: int) -> None:
    """Linux: the kernel SIGKILLs this child when `parent` dies, however it dies (SIGKILL, the
    OOM killer), so that it never reads on for no one; elsewhere nothing. (PR_SET_PDEATHSIG
    follows the thread that forked: the agent's main thread, which lives as long as it.)"""
    try:
        import ctypes  # noqa: PLC0415 - the child's, never the parent's

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl
        os._exit(_FAILED)


def _child(path: Path, prepare: Callable[[Config], Any], write_end: int) -> None:
    """The forked child: the outcome into `write_end`, then exit at once (no atexit handlers,
    no flush of stdio buffers the parent also holds). Anything unexpected: exit _FAILED."""
    status = _FAILED
    try:
        data = _outcome(path, prepare)
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)
        status = 0
    finally:
        os._exit(status)


def _main(argv: list[str]) -> int:
    """`python -m edge_agent.config.isolated PATH MODULE NAME FD`: the outcome into FD."""
    path, module, name, fd = argv
    prepare: Any = importlib.import_module(module)
    for part in name.split("."):
        prepare = getattr(prepare, part)
    data = _outcome(Path(path), prepare)
    with os.fdopen(int(fd), "wb") as pipe:
        pipe.write(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
