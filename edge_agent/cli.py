"""The `edge-agent` command line (docs/contract.md §1): argument parsing and exit codes, no more."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_agent import __version__


def _cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.config import load_config  # noqa: PLC0415 - keep `--help` fast
    from edge_agent.errors import ConfigError  # noqa: PLC0415
    from edge_agent.logs import journal_prefix  # noqa: PLC0415

    try:
        config = load_config(Path(args.file))
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        # One located line per problem; under journald (ExecStartPre=, ExecReload=) each line
        # carries the error priority.
        error = journal_prefix(logging.ERROR)
        for line in str(exc).splitlines():
            print(f"{error}{line}", file=sys.stderr)
        count = len(exc.problems)
        print(f"{error}{args.file}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid ({len(config.sources)} sources)")
    if getattr(args, "plan", False):
        from edge_agent.sources.modbus.plan_report import print_plans  # noqa: PLC0415

        print_plans(config)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from edge_agent.seal.keys import write_keypair, write_next_keypair  # noqa: PLC0415

    if args.next:
        if args.force:
            print("keygen: --next never replaces a key; --force does not apply", file=sys.stderr)
            return 2
        kid, path = write_next_keypair(Path(args.out))
        print(kid.hex())
        print(f"keygen: wrote {path} and {path.with_suffix('.pub')}", file=sys.stderr)
        return 0
    try:
        kid = write_keypair(Path(args.out), force=args.force)
    except FileExistsError as exc:
        print(f"keygen: {exc}", file=sys.stderr)
        return 1
    print(kid.hex())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import run_agent  # noqa: PLC0415

    return run_agent(Path(args.config), log_format=args.log_format)


def _cmd_verify(args: argparse.Namespace) -> int:
    from edge_agent.consumer.verify import run_verify  # noqa: PLC0415

    return run_verify(args)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from edge_agent.consumer.ingest.cli import run_ingest  # noqa: PLC0415 - psycopg only here

    return run_ingest(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_agent.status import show_status  # noqa: PLC0415

    return show_status(args.url, as_json=args.json)


def _cmd_browse(args: argparse.Namespace) -> int:
    from edge_agent.sources.opcua.browse import run_browse  # noqa: PLC0415

    return run_browse(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.demo import run_demo  # noqa: PLC0415

    return run_demo(args)


def _cmd_probe(args: argparse.Namespace) -> int:
    from edge_agent.sources.modbus.probe import run_probe  # noqa: PLC0415 - pymodbus only when probing

    return run_probe(args)


def _add_browse_arguments(browse: argparse.ArgumentParser) -> None:
    """`browse` options; the security ones mirror the OPC UA source's `security:` keys."""
    browse.add_argument("endpoint", help="opc.tcp://host:port[/path]")
    browse.add_argument(
        "--node", default="i=85", help="start node id, ns= or nsu= form (default: i=85, Objects)"
    )
    browse.add_argument("--depth", type=int, default=3, help="levels to descend (default: 3)")
    browse.add_argument(
        "--include-standard",
        action="store_true",
        help="also list namespace-0 nodes (the Server object's diagnostics)",
    )
    browse.add_argument(
        "--policy",
        default="None",
        choices=["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"],
    )
    browse.add_argument(
        "--mode", choices=["Sign", "SignAndEncrypt"], help="default: SignAndEncrypt with a policy"
    )
    browse.add_argument("--server-certificate", type=Path, help="pinned server certificate")
    browse.add_argument("--trust-dir", type=Path, help="directory of trusted certificates")
    browse.add_argument(
        "--pki-dir",
        type=Path,
        help="client certificate and key (default: /var/lib/edge-agent/opcua)",
    )
    browse.add_argument("--username")
    browse.add_argument("--password-file", type=Path)
    browse.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")


def _add_verify_arguments(verify: argparse.ArgumentParser) -> None:
    verify.add_argument(
        "--url", default="mqtt://127.0.0.1:1883", help="broker (mqtt:// or mqtts://)"
    )
    verify.add_argument(
        "--topic",
        default="#",
        help="topic filter; batches are on {prefix}/{gateway}/batch (default: #)",
    )
    verify.add_argument(
        "--key",
        action="append",
        metavar="PUBFILE",
        help="a trusted public key (PEM); repeat for several gateways",
    )
    verify.add_argument(
        "--trust",
        action="append",
        metavar="FILE",
        help="a trust file: keys by kid with validity and retirement (docs/security.md)",
    )
    verify.add_argument("--ca-file", help="CA bundle for mqtts://")
    verify.add_argument("--username")
    verify.add_argument("--password-file")
    verify.add_argument(
        "--client-id",
        default="edge-agent-verify",
        help="persistent session id (default: edge-agent-verify)",
    )
    verify.add_argument("--state", help="file that keeps completeness state across restarts")
    verify.add_argument(
        "--ack-key",
        metavar="KEYFILE",
        help="the consumer's private key (edge-agent keygen): acknowledge what --state holds, "
        "for agents in mqtt.ack: end_to_end mode (needs --state)",
    )
    verify.add_argument("--duration", type=float, help="stop after this many seconds")
    verify.add_argument("--count", type=int, help="stop after this many readings")
    verify.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    verify.add_argument("--json", action="store_true", help="print readings as JSON lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Polls Modbus and OPC UA devices, buffers every reading, "
        "forwards signed batches over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    run = add("run", _cmd_run, "Run the agent in the foreground.")
    run.add_argument("--config", "-c", required=True, help="the YAML configuration file")
    run.add_argument(
        "--log-format",
        choices=["auto", "text", "journal", "json"],
        default="auto",
        help="auto (default): journal under systemd's journal, else text; json: one object a line",
    )

    check = add("check-config", _cmd_check_config, "Validate a configuration file.")
    check.add_argument("file")
    check.add_argument(
        "--plan",
        action="store_true",
        help="also print the Modbus read requests planned for each device",
    )

    keygen = add("keygen", _cmd_keygen, "Create an Ed25519 signing key pair.")
    keygen.add_argument("--out", required=True, help="directory for signing.key and signing.pub")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    keygen.add_argument(
        "--next",
        action="store_true",
        help="rotation: a new pair signing-KID.key/.pub beside the current one, which stays",
    )

    _add_verify_arguments(
        add(
            "verify",
            _cmd_verify,
            "Subscribe to batches, verify signatures and completeness, print readings.",
        )
    )

    from edge_agent.consumer.ingest.cli import add_arguments  # noqa: PLC0415

    add_arguments(
        add(
            "ingest",
            _cmd_ingest,
            "The fleet's consumer: batches from the broker into PostgreSQL (docs/cloud.md).",
        )
    )

    _add_browse_arguments(
        add(
            "browse",
            _cmd_browse,
            "List the variables under an OPC UA node as a config `nodes:` list.",
        )
    )

    status = add("status", _cmd_status, "Show the health of a running agent.")
    status.add_argument("--url", default="http://127.0.0.1:8710", help="health endpoint base URL")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    demo = add(
        "demo",
        _cmd_demo,
        "Run simulated devices, the agent, a local broker and the verifier, with a live view.",
    )
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument(
        "--no-tui", action="store_true", help="plain log lines instead of the live view"
    )
    demo.add_argument(
        "--outage",
        action="store_true",
        help="stop the broker for 10 s after 8 s, to show buffering and recovery",
    )
    demo.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="Mosquitto from PATH (auto, when installed) or the embedded amqtt",
    )

    probe = add("probe", _cmd_probe, "Read a device once and show the values for every setting.")
    protocols = probe.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    modbus = protocols.add_parser(
        "modbus",
        help="read a register block; print it under every type and byte order",
        description="Read a register block; print it under every type and byte order.",
    )
    modbus.set_defaults(handler=_cmd_probe)
    modbus.add_argument("--host", help="TCP device or gateway")
    modbus.add_argument("--port", type=int, default=502)
    modbus.add_argument("--serial-port", help="RTU: the serial device, e.g. /dev/ttyUSB0")
    modbus.add_argument("--baudrate", type=int, default=19200)
    modbus.add_argument("--parity", choices=["N", "E", "O"], default="E")
    modbus.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    modbus.add_argument("--unit", type=int, default=1, help="unit (slave) id, default 1")
    modbus.add_argument(
        "--register", choices=["holding", "input", "coil", "discrete"], default="holding"
    )
    modbus.add_argument("--address", type=int, required=True, help="0-based protocol address")
    modbus.add_argument("--count", type=int, default=8, help="registers (or bits) to read")
    modbus.add_argument("--timeout", type=float, default=2.0, help="seconds, default 2")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 0
