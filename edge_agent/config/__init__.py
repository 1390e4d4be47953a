"""Configuration: the models of docs/contract.md §2 and the loader that locates every problem.

The loader (and PyYAML with it) is imported on first use of `load_config` or `parse_config`: a
process that is handed a validated configuration (`edge-agent run`, edge_agent/config/isolated.py)
never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_agent.config.schema import Config

if TYPE_CHECKING:
    from edge_agent.config.loader import load_config, parse_config

__all__ = ["Config", "load_config", "parse_config"]


def __getattr__(name: str) -> Any:
    if name in ("load_config", "parse_config"):
        from edge_agent.config import loader  # noqa: PLC0415 - on first use, see above

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
