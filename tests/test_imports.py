"""Import boundaries, each checked in a fresh interpreter: what a module loads is what it costs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def loaded_after(code: str) -> set[str]:
    """The names in sys.modules after running `code` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "leaf", ["metrics", "logs", "schedule", "audit", "yaml_file", "secret_file"]
)
def test_a_leaf_module_imports_nothing_of_the_package(leaf: str) -> None:
    loaded = loaded_after(f"import edge_agent.{leaf}")
    assert {n for n in loaded if n.startswith("edge_agent")} == {"edge_agent", f"edge_agent.{leaf}"}


BUILD = """
from pydantic import TypeAdapter
from edge_agent.config.schema import SourceConfig
from edge_agent.sources import SourceContext, build_source
config = TypeAdapter(SourceConfig).validate_python({source})
assert build_source(config, SourceContext()).name == config.name
"""
SOURCES = {
    "simulated": {"type": "simulated", "name": "sim", "points": 2},
    "modbus": {"type": "modbus", "name": "plc", "host": "127.0.0.1",
               "points": [{"name": "p", "register": "holding", "address": 0, "type": "uint16"}]},
    "opcua": {"type": "opcua", "name": "ua", "endpoint": "opc.tcp://127.0.0.1:4840",
              "security": {"policy": "None"}, "nodes": [{"name": "n", "node_id": "ns=2;i=1"}]},
}  # fmt: skip


def test_a_protocol_stack_is_imported_only_by_building_a_source_that_uses_it() -> None:
    loaded = {kind: loaded_after(BUILD.format(source=s)) for kind, s in SOURCES.items()}
    assert "asyncua" not in loaded["modbus"], "a Modbus-only gateway loaded asyncua"
    assert "pymodbus" not in loaded["opcua"], "an OPC UA-only gateway loaded pymodbus"
    assert not {"asyncua", "pymodbus", "serial"} & loaded["simulated"]
    assert "asyncua" in loaded["opcua"]  # each was built
    assert "edge_agent.sources.modbus.link" in loaded["modbus"]


def test_a_modbus_gateway_runs_without_pymodbus() -> None:
    """The agent's own frames and decoder: pymodbus (about 1 MB more) is for tests and tools."""
    loaded = loaded_after(BUILD.format(source=SOURCES["modbus"]) + "import edge_agent.agent")
    assert "pymodbus" not in loaded


def test_the_agent_leaves_yaml_to_the_child_that_reads_the_file() -> None:
    """`edge-agent run` is handed its configuration validated by a child process
    (edge_agent/config/isolated.py): the loader and PyYAML (about 1 MB) stay out of it."""
    loaded = loaded_after("import edge_agent.agent, edge_agent.cli")
    assert not {"yaml", "edge_agent.config.loader"} & loaded
    assert "yaml" in loaded_after("from edge_agent.config import load_config")


def test_a_gateway_never_loads_the_database_driver() -> None:
    """psycopg comes with the `cloud` extra, for `edge-agent ingest`: a gateway's agent, its
    command line and `verify` run without it."""
    loaded = loaded_after(
        BUILD.format(source=SOURCES["modbus"])
        + "import edge_agent.agent, edge_agent.cli, edge_agent.consumer.verify\n"
        + "edge_agent.cli.build_parser()"
    )
    assert not {n for n in loaded if n.startswith("psycopg")}
    assert not {n for n in loaded if n.startswith("edge_agent.consumer.ingest.")} - {
        "edge_agent.consumer.ingest.cli"
    }


def test_ingest_depends_on_the_seal_not_on_the_agent() -> None:
    """The cloud side reads and deploys alone: no agent, store, forwarder or source in it."""
    loaded = loaded_after(
        "import edge_agent.consumer.ingest.worker, edge_agent.consumer.ingest.report"
    )
    ours = {n.split(".")[1] for n in loaded if n.startswith("edge_agent.")}
    assert ours <= {"consumer", "seal", "errors", "reading", "yaml_file", "secret_file"}, ours
    assert "psycopg" in loaded


def test_the_agent_loads_no_web_framework() -> None:
    """The health endpoint is asyncio streams and h11: aiohttp's server cost 12-16 MB of RSS."""
    loaded = loaded_after("import edge_agent.agent")
    assert "h11" in loaded
    assert not {n.split(".")[0] for n in loaded} & {"aiohttp", "multidict", "yarl"}
