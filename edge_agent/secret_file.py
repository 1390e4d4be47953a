"""Reads a secret (a password) kept in a file of its own: the `_file` form of every secret.

One rule for the agent's configuration (`password_file`, docs/contract.md §2), `verify
--password-file` and `ingest run --password-file`: the file is UTF-8 and its trailing line
break is not part of the secret (an editor or `echo` adds one). A leaf: imports nothing of the
package, so the consumers may use it.
"""

from __future__ import annotations

from pathlib import Path


def read_secret_file(path: Path) -> str:
    """The secret in `path`, without its trailing CR/LF.

    Raises OSError when the file cannot be read, UnicodeDecodeError (a ValueError) when it is
    not UTF-8.
    """
    return path.read_text(encoding="utf-8").rstrip("\r\n")
