"""A corpus of broken configurations (tests/helpers/broken_configs.py), each refused within a
second with a message naming the place: types, unknown and duplicate keys, `!!python` tags, alias
bombs, a 10 MB file, a directory, a FIFO, duplicate names, overlapping points, write functions,
odd ports, text that is not UTF-8, secrets in the wrong place.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers.broken_configs import BASE, CORPUS, Broken

from edge_agent.config import load_config
from edge_agent.config.opcua import node_id_problem
from edge_agent.errors import ConfigError
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.unit

REFUSE_WITHIN_S = 1.0
"""Per file, once the modules check-config uses are imported (asyncua, for node ids, takes
about a second to import on its own: that is start-up, not the refusal)."""


def corpus_file(tmp_path: Path, case: Broken) -> Path:
    """The broken file of `case`, with a valid key and buffer path around it."""
    write_keypair(tmp_path / "keys")
    base = BASE.format(store=tmp_path / "buffer.db", key=tmp_path / "keys" / "signing.key")
    path = tmp_path / f"{case.id}.yaml"
    case.make(path, base)
    return path


def refusal(path: Path) -> str:
    """What check-config prints for `path` (stderr), or "" if the file is valid."""
    try:
        load_config(path)
    except ConfigError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"
    return ""


def test_the_corpus_is_large_enough_and_the_base_is_valid(tmp_path: Path) -> None:
    assert len(CORPUS) >= 40
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    write_keypair(tmp_path / "keys")
    path = tmp_path / "valid.yaml"
    path.write_text(BASE.format(store=tmp_path / "b.db", key=tmp_path / "keys" / "signing.key"))
    assert refusal(path) == ""


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_each_broken_config_is_refused_quickly_naming_the_place(
    tmp_path: Path, case: Broken
) -> None:
    path = corpus_file(tmp_path, case)
    node_id_problem("i=85")  # imports asyncua, as check-config does for an OPC UA source
    started = time.monotonic()
    message = refusal(path)
    elapsed = time.monotonic() - started
    assert message, f"{case.id} was accepted"
    assert elapsed < REFUSE_WITHIN_S, f"{case.id} took {elapsed:.2f}s"
    assert "Traceback" not in message
    assert all(line.startswith(str(path)) for line in message.splitlines()), message
    assert case.expected in message, message
