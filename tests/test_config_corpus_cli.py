"""The broken-config corpus through `check-config` as an operator runs it: exit 1 (2 for what
is not a regular file), the located message on stderr, a count line, and never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.broken_configs import BASE, CORPUS

from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.integration

NOT_A_FILE = {"directory", "fifo"}
ONE_OF_EACH_KIND = {
    "id-not-text", "unknown-top-key", "duplicate-section", "python-apply", "alias-bomb",
    "ten-megabytes", "directory", "fifo", "not-utf8", "duplicate-source", "overlap-int32",
    "write-function-code", "port-zero", "credentials-in-url", "key-readable-by-others",
}  # fmt: skip
"""A process per file costs a second of start-up: the whole corpus runs in-process in
test_config_corpus.py, and one file of each kind through the command here."""


def test_check_config_refuses_one_broken_config_of_each_kind(tmp_path: Path) -> None:
    write_keypair(tmp_path / "keys")
    base = BASE.format(store=tmp_path / "buffer.db", key=tmp_path / "keys" / "signing.key")
    refused = []
    for case in (case for case in CORPUS if case.id in ONE_OF_EACH_KIND):
        path = tmp_path / f"{case.id}.yaml"
        case.make(path, base)
        result = subprocess.run(
            [sys.executable, "-m", "edge_agent", "check-config", str(path)],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        assert result.returncode == (2 if case.id in NOT_A_FILE else 1), (case.id, result.stderr)
        assert "Traceback" not in result.stderr, case.id
        assert case.expected in result.stderr, (case.id, result.stderr)
        assert result.stdout == "", case.id
        if case.id not in NOT_A_FILE:
            assert result.stderr.rstrip().endswith(("1 problem", "problems")), result.stderr
        refused.append(case.id)
        if case.id == "key-readable-by-others":
            (tmp_path / "keys" / "signing.key").chmod(0o600)
    assert set(refused) == ONE_OF_EACH_KIND
