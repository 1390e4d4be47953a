"""Node ids against a server's namespace table: `nsu=` URIs resolved to the current index, and
the URI form written back for `browse`.

A namespace index is only a position in the server's NamespaceArray (i=2255), which the server
may order differently after a restart or a reconfiguration; the URI is the stable name. So the
source reads the table at every connect and resolves each `nsu=` node id again, and `browse`
prints node ids in the URI form for the config to be written with it.
"""

from __future__ import annotations

from urllib.parse import quote

from asyncua import ua
from asyncua.client.client import Client

from edge_agent.config.opcua import NodeIdText, parse_node_id
from edge_agent.errors import EdgeAgentError

_KINDS = {
    "i": ua.NodeIdType.Numeric,
    "s": ua.NodeIdType.String,
    "g": ua.NodeIdType.Guid,
    "b": ua.NodeIdType.ByteString,
}


class UnknownNamespaceError(EdgeAgentError):
    """A node id names a namespace URI the server does not have (now)."""

    def __init__(self, uri: str, table: list[str]) -> None:
        super().__init__(
            f"namespace {uri} is not on the server (it has: {', '.join(table[1:]) or 'none'})"
        )
        self.uri = uri


async def namespace_table(client: Client) -> list[str]:
    """The server's NamespaceArray: index -> URI, index 0 being the OPC UA namespace."""
    return list(await client.get_namespace_array())


def resolve(text: str | NodeIdText, table: list[str]) -> ua.NodeId:
    """The wire NodeId for a config node id; `nsu=` is looked up in `table`.

    Raises UnknownNamespaceError for a URI not in the table, ValueError for a malformed id
    (check-config refuses those first).
    """
    parsed = parse_node_id(text) if isinstance(text, str) else text
    namespace = parsed.namespace
    if isinstance(namespace, str):
        if namespace not in table:
            raise UnknownNamespaceError(namespace, table)
        namespace = table.index(namespace)
    return ua.NodeId(parsed.identifier, namespace, _KINDS[parsed.kind])  # type: ignore[arg-type]


def uri_form(node_id: ua.NodeId, table: list[str]) -> str:
    """`nsu=<uri>;s=...` for a node outside namespace 0 whose index is in `table`, else the
    index form; `;` and `%` in the URI are percent-encoded (OPC 10000-6 §5.1.12)."""
    text = str(node_id.to_string())
    index = node_id.NamespaceIndex
    if index == 0 or index >= len(table):
        return text
    identifier = text.split(";", 1)[1] if text.startswith("ns=") else text
    return f"nsu={quote(table[index], safe=':/?#[]@!$&()*+,=-._~')};{identifier}"
