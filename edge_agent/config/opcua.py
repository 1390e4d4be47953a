"""Configuration of OPC UA sources: endpoint, security, subscription or polling, nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edge_agent.config.types import Duration, Name, StrictModel


class OpcuaSecurity(StrictModel):
    policy: Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    server_certificate: Path | None = None


class OpcuaNode(StrictModel):
    name: Name
    node_id: str = Field(min_length=1)


class OpcuaSourceConfig(StrictModel):
    type: Literal["opcua"]
    name: Name
    endpoint: str = Field(pattern=r"^opc\.tcp://")
    security: OpcuaSecurity
    mode: Literal["subscribe", "poll"] = "subscribe"
    interval: Duration = 1.0
    nodes: list[OpcuaNode] = Field(min_length=1)

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems, as (location relative to this source, message)."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            if node.name in seen:
                found.append(
                    (("nodes", index, "name"),
                     f"duplicate node name {node.name!r} (also nodes[{seen[node.name]}])")
                )
            seen.setdefault(node.name, index)
        return found
