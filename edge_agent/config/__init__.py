"""Configuration: the models of docs/contract.md §2 and the loader that locates every problem."""

from edge_agent.config.loader import load_config, parse_config
from edge_agent.config.schema import Config

__all__ = ["Config", "load_config", "parse_config"]
