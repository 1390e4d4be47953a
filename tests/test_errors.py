"""Every exception class of edge-agent belongs to the one tree that errors.py draws."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import edge_agent
from edge_agent import errors
from edge_agent.errors import EdgeAgentError

pytestmark = pytest.mark.unit


def package_exceptions() -> set[type[BaseException]]:
    """Every exception class defined anywhere in edge_agent (all modules imported first)."""
    for info in pkgutil.walk_packages(edge_agent.__path__, "edge_agent."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    seen: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [BaseException]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return {cls for cls in seen if cls.__module__.split(".")[0] == "edge_agent"}


def drawn_tree() -> dict[str, str | None]:
    """The drawing in errors.py's docstring as {class name: parent name}."""
    lines = (errors.__doc__ or "").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "EdgeAgentError")
    indent = lines[start].index("EdgeAgentError")
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            break
        match = re.search(r"[A-Z]\w*", line)
        assert match, line
        depth = (match.start() - indent) // 4
        path[depth:] = [match.group()]
        parents[match.group()] = path[depth - 1] if depth else None
    return parents


def test_every_exception_class_subclasses_the_tree_and_is_drawn_where_it_sits() -> None:
    classes = package_exceptions()
    assert len(classes) >= 18, sorted(c.__name__ for c in classes)  # the walk found them all
    outside = sorted(c.__qualname__ for c in classes if not issubclass(c, EdgeAgentError))
    assert not outside, f"not under EdgeAgentError: {outside}"
    tree = drawn_tree()
    missing = sorted(c.__name__ for c in classes if c.__name__ not in tree)
    assert not missing, f"not drawn in errors.py's docstring: {missing}"
    for cls in classes - {EdgeAgentError}:
        parent = next(b for b in cls.__bases__ if issubclass(b, EdgeAgentError))
        assert tree[cls.__name__] == parent.__name__, cls
    assert set(tree) == {c.__name__ for c in classes}, "the drawing names a class that is gone"


def test_the_forwarders_and_opcua_errors_are_caught_as_edge_agent_errors() -> None:
    from edge_agent.forward.mqtt import PublishRejectedError
    from edge_agent.sources.opcua.security import UntrustedCertificateError
    from edge_agent.sources.opcua.source import ConnectionLostError

    for error in (
        PublishRejectedError(0x87, "t/gw/batch"),
        ConnectionLostError("gone"),
        UntrustedCertificateError("sha1=..."),
    ):
        try:
            raise error
        except EdgeAgentError as caught:
            assert caught is error
