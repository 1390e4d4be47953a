"""`edge-agent browse`: the variables under an OPC UA node, as a `nodes:` list for the config.

It connects exactly as the source would (same security, same certificate checks, so a rejected
server certificate is reported here first, with its thumbprints), follows hierarchical references
down to `--depth`, and reads each variable's data type and current value in batched Read
requests. Only Browse and Read are used: browsing never changes anything on the server.

Node ids are printed with their namespace URI (`nsu=urn:example:plant;s=Tank.Level`), not the
index: a server may number its namespaces differently after a restart, the URI stays. `--node`
takes either form.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import dataclass
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds

from edge_agent.config.opcua import DEFAULT_PKI_DIR, OpcuaAuth, OpcuaSecurity, node_id_problem
from edge_agent.reading import RejectedValue
from edge_agent.sources.opcua.namespaces import namespace_table, resolve, uri_form
from edge_agent.sources.opcua.security import configure_client
from edge_agent.sources.opcua.values import convert, quality_of

_READ_BATCH = 500
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Variable:
    """One variable found: where it is, its id, and what it holds now."""

    path: str
    node_id: ua.NodeId
    data_type: str = "?"
    value: Any = None
    status: int = 0


def run_browse(args: argparse.Namespace) -> int:
    """Print the YAML list; 0 on success, 1 when the server cannot be reached or browsed."""
    try:
        security = OpcuaSecurity(
            policy=args.policy,
            mode=args.mode,
            server_certificate=args.server_certificate,
            trust_dir=args.trust_dir,
            pki_dir=args.pki_dir or DEFAULT_PKI_DIR,
        )
        auth = (
            OpcuaAuth(username=args.username, password_file=args.password_file)
            if args.username
            else None
        )
    except ValueError as exc:
        print(f"browse: {exc}", file=sys.stderr)
        return 2
    problem = node_id_problem(args.node)
    if problem is not None:
        print(f"browse: --node: {problem}", file=sys.stderr)
        return 2
    try:
        text = asyncio.run(
            browse(
                args.endpoint,
                security,
                auth,
                node=args.node,
                depth=args.depth,
                include_standard=args.include_standard,
                request_timeout=args.timeout,
            )
        )
    except Exception as exc:  # noqa: BLE001 - report any failure as one line, not a traceback
        print(f"browse: {args.endpoint}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


async def browse(
    endpoint: str,
    security: OpcuaSecurity,
    auth: OpcuaAuth | None = None,
    *,
    node: str = "i=85",
    depth: int = 3,
    include_standard: bool = False,
    request_timeout: float = 10.0,
) -> str:
    """The YAML `nodes:` list of the variables under `node` (either node id form), with type
    and value comments; node ids in the `nsu=` form. Raises ValueError for a malformed `node`,
    UnknownNamespaceError for a namespace URI the server does not have."""
    client = Client(endpoint, timeout=request_timeout)
    async with asyncio.timeout(request_timeout * 2):
        await configure_client(client, security, auth)
        await client.connect()
    try:
        table = await namespace_table(client)
        start = resolve(node, table)
        found = await _walk(client, start, depth, include_standard)
        await _read(client, found)
    finally:
        await client.disconnect()
    return render(endpoint, node, found, table)


async def _walk(client: Client, start: ua.NodeId, depth: int, standard: bool) -> list[Variable]:
    found: list[Variable] = []
    level: list[tuple[ua.NodeId, str]] = [(start, "")]
    seen = {start}
    for _ in range(max(depth, 1)):
        following: list[tuple[ua.NodeId, str]] = []
        for parent, prefix in level:
            refs = await client.get_node(parent).get_children_descriptions(
                refs=ObjectIds.HierarchicalReferences
            )
            for ref in refs:
                child = ref.NodeId
                if child in seen or (child.NamespaceIndex == 0 and not standard):
                    continue
                seen.add(child)
                path = f"{prefix}.{ref.BrowseName.Name}" if prefix else str(ref.BrowseName.Name)
                if ref.NodeClass == ua.NodeClass.Variable:
                    found.append(Variable(path, child))
                if ref.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable):
                    following.append((child, path))
        level = following
    return found


async def _read(client: Client, found: list[Variable]) -> None:
    """Data type and value of every variable, in batched Read requests."""
    for start in range(0, len(found), _READ_BATCH):
        batch = found[start : start + _READ_BATCH]
        params = ua.ReadParameters()
        params.TimestampsToReturn = ua.TimestampsToReturn.Neither
        for var in batch:
            for attribute in (AttributeIds.DataType, AttributeIds.Value):
                item = ua.ReadValueId()
                item.NodeId = var.node_id
                item.AttributeId = attribute
                params.NodesToRead.append(item)
        results = await client.uaclient.read(params)
        for index, var in enumerate(batch):
            data_type, value = results[2 * index], results[2 * index + 1]
            type_id = data_type.Value.Value if data_type.Value is not None else None
            if isinstance(type_id, ua.NodeId):
                var.data_type = _type_name(type_id)
            var.status = int(value.StatusCode.value) if value.StatusCode is not None else 0
            if value.Value is not None:
                var.value = value.Value.Value


def _type_name(type_id: ua.NodeId) -> str:
    if type_id.NamespaceIndex == 0 and isinstance(type_id.Identifier, int):
        return str(ObjectIdNames.get(type_id.Identifier, type_id.to_string()))
    return str(type_id.to_string())


def render(endpoint: str, node: str, found: list[Variable], table: list[str]) -> str:
    """YAML that pastes under a source: unique config names, node ids with their namespace URI
    (from the server's namespace `table`), type and value as comments."""
    lines = [f"# {len(found)} variables under {node} on {endpoint}", "nodes:"]
    used: set[str] = set()
    for var in found:
        name = point_name(var.path, used)
        quality = quality_of(var.status)
        if quality.value == "bad":
            shown = f"bad {ua.StatusCode(ua.UInt32(var.status)).name}"
        else:
            try:
                value, flagged = convert(var.value)
                shown = repr(value) + (" (sent as text)" if flagged else "")
            except RejectedValue as exc:
                shown = f"refused, sent as bad: {exc}"
        node_id = uri_form(var.node_id, table).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'  - {{name: {name}, node_id: "{node_id}"}}  # {var.data_type} = {shown}')
    return "\n".join(lines) + "\n"


def point_name(path: str, used: set[str]) -> str:
    """A unique config name from a browse path: `Plant.Mill 1.Speed` -> `Plant.Mill_1.Speed`."""
    base = _NAME_CHARS.sub("_", path).strip("_.")[-64:] or "node"
    name, counter = base, 2
    while name in used:
        suffix = f"_{counter}"
        name, counter = base[: 64 - len(suffix)] + suffix, counter + 1
    used.add(name)
    return name
