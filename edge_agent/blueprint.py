"""What an agent is built from, made where the configuration is validated.

`edge-agent run` reads and validates its file in a child process (edge_agent/config/isolated.py)
and gets back a `Blueprint`: the validated config with each source's config made light
(`prepare_source`: a Modbus source without its point models) and, beside it, what was left out
in a compact form (the points by column) and each source's digest. Nothing of it is validated
again, and the agent builds the same sources from it as from the whole config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edge_agent.config.schema import Config, SourceConfig
from edge_agent.sources import prepare_source


@dataclass
class PreparedSources:
    """What `Blueprint.of` took out of the sources' configs, for `Agent` to build them with."""

    digests: dict[str, str]
    """Each source's `source_digest`, of its whole config (a reload compares them)."""
    parts: dict[str, object]
    """What `prepare_source` left out of a source's config, by source name."""


@dataclass
class Blueprint:
    """A validated config with light source configs, and what they left out."""

    config: Config
    """The validated config; its sources as `prepare_source` left them."""
    prepared: PreparedSources

    @classmethod
    def of(cls, config: Config) -> Blueprint:
        """The blueprint of a validated config. Never raises for a validated config."""
        digests = {c.name: source_digest(c) for c in config.sources}
        light: list[SourceConfig] = []
        parts: dict[str, object] = {}
        for source in config.sources:
            made_light, part = prepare_source(source)
            light.append(made_light)
            if part is not None:
                parts[source.name] = part
        config = config.model_copy(update={"sources": light})
        return cls(config, PreparedSources(digests, parts))


def source_digest(config: SourceConfig) -> str:
    """A source config's fingerprint: equal for equal configs, without keeping the model."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()
