"""The `edge-agent ingest` subcommands: run, migrate, keys add|retire|list, report.

Exit statuses: 0 done; 1 the database refused or is not migrated; 2 bad arguments (or the
`cloud` extra missing); 4 (`report`) an unexplained hole.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

EXIT_ERROR = 1
EXIT_BAD_ARGUMENTS = 2


def add_arguments(ingest: argparse.ArgumentParser) -> None:
    """The subcommands of `edge-agent ingest` and their options."""
    commands = ingest.add_subparsers(dest="ingest_command", required=True, metavar="SUBCOMMAND")

    def dsn(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
        parser.add_argument(
            "--dsn",
            required=required,
            help="PostgreSQL connection string (libpq: 'host=... dbname=... user=...' or a "
            "postgresql:// URL); keep the password in ~/.pgpass or PGPASSWORD, not here",
        )

    run = commands.add_parser(
        "run", help="a worker: MQTT in, PostgreSQL out", description="Run one ingest worker."
    )
    run.add_argument("--config", "-c", help="YAML file of these settings (options win)")
    dsn(run, required=False)
    run.add_argument("--url", help="broker, mqtt:// or mqtts:// (default mqtt://127.0.0.1:1883)")
    run.add_argument("--group", help="shared subscription name (default: ingest)")
    run.add_argument(
        "--ack-key", help="the consumer's Ed25519 key (keygen): publish acknowledgements"
    )
    run.add_argument("--topic-prefix", dest="topic_prefix", help="the agents' mqtt.topic_prefix")
    run.add_argument(
        "--client-id",
        dest="client_id",
        help="MQTT client id, unique per worker (default: from the group and host name)",
    )
    run.add_argument("--ca-file", dest="ca_file", help="CA bundle for mqtts://")
    run.add_argument("--username")
    run.add_argument("--password-file", dest="password_file")
    run.add_argument(
        "--max-group", dest="max_group", type=int, help="messages per transaction (default 64)"
    )
    run.add_argument(
        "--ack-interval",
        dest="ack_interval",
        type=float,
        help="seconds between acknowledgements of one gateway epoch (default 0.5)",
    )
    run.set_defaults(ingest_handler=_run)

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the schema", description="Create or upgrade the schema."
    )
    dsn(migrate)
    migrate.set_defaults(ingest_handler=_migrate)

    keys = commands.add_parser("keys", help="gateway public keys", description="Gateway keys.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = key_commands.add_parser("add", help="enrol a gateway's public key (keygen's .pub)")
    dsn(add)
    add.add_argument("--gateway", required=True, help="the gateway id (its gateway.id)")
    add.add_argument("--key", required=True, type=Path, help="the PEM public key file")
    add.add_argument(
        "--not-before", type=_when, help="ISO 8601 time; batches sealed earlier refused"
    )
    add.add_argument("--not-after", type=_when, help="ISO 8601 time; batches sealed later refused")
    add.set_defaults(ingest_handler=_keys_add)
    retire = key_commands.add_parser("retire", help="refuse every batch a key signs")
    dsn(retire)
    retire.add_argument("--kid", required=True, help="the key id, 16 hex digits")
    retire.set_defaults(ingest_handler=_keys_retire)
    listing = key_commands.add_parser("list", help="the enrolled keys")
    dsn(listing)
    listing.add_argument("--gateway", help="only this gateway's keys")
    listing.set_defaults(ingest_handler=_keys_list)

    report = commands.add_parser(
        "report",
        help="completeness per gateway and epoch (exit 4 on an unexplained hole)",
        description="Completeness per gateway and epoch; exit 4 on an unexplained hole.",
    )
    dsn(report)
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(ingest_handler=_report)


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +00:00)")
    return value


def run_ingest(args: argparse.Namespace) -> int:
    """Dispatch an `ingest` subcommand; its exit status."""
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("edge_agent.consumer.ingest").setLevel(logging.INFO)
    try:
        import psycopg  # noqa: PLC0415 - only with the cloud extra
    except ImportError:
        print("ingest: needs the cloud extra: pip install 'edge-agent[cloud]'", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    try:
        return int(args.ingest_handler(args))
    except psycopg.OperationalError as exc:
        print(f"ingest: cannot reach PostgreSQL: {str(exc).strip()}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.Error as exc:
        print(f"ingest: PostgreSQL refused: {str(exc).strip()}", file=sys.stderr)
        return EXIT_ERROR


def _connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    import psycopg  # noqa: PLC0415

    return psycopg.connect(dsn, connect_timeout=10)


def _run(args: argparse.Namespace) -> int:
    from edge_agent.consumer.ingest.settings import load_settings  # noqa: PLC0415
    from edge_agent.consumer.ingest.worker import run_worker  # noqa: PLC0415

    try:
        settings = load_settings(args)
    except (OSError, ValueError) as exc:
        print(f"ingest run: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    return run_worker(settings)


def _migrate(args: argparse.Namespace) -> int:
    from edge_agent.consumer.ingest.schema import migrate  # noqa: PLC0415

    with _connect(args.dsn) as conn:
        before, after = migrate(conn)
    if before == after:
        print(f"ingest migrate: schema version {after}, nothing to do")
    else:
        print(f"ingest migrate: schema version {before} -> {after}")
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from edge_agent.consumer.ingest.keystore import add_key  # noqa: PLC0415

    try:
        with _connect(args.dsn) as conn:
            kid = add_key(
                conn, args.gateway, args.key, not_before=args.not_before, not_after=args.not_after
            )
    except (OSError, ValueError) as exc:
        print(f"ingest keys add: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    print(kid.hex())
    return 0


def _keys_retire(args: argparse.Namespace) -> int:
    from edge_agent.consumer.ingest.keystore import retire_key  # noqa: PLC0415

    try:
        with _connect(args.dsn) as conn:
            gateway = retire_key(conn, args.kid)
    except ValueError as exc:
        print(f"ingest keys retire: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    print(f"ingest keys retire: key id {args.kid} of gateway {gateway} retired", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from edge_agent.consumer.ingest.keystore import format_keys, list_keys  # noqa: PLC0415

    with _connect(args.dsn) as conn:
        for line in format_keys(list_keys(conn, args.gateway)):
            print(line)
    return 0


def _report(args: argparse.Namespace) -> int:
    from edge_agent.consumer.ingest import report  # noqa: PLC0415

    with _connect(args.dsn) as conn:
        data = report.collect(conn)
    code, lines = report.render(data)
    if args.json:
        print(report.to_json(data))
    else:
        for line in lines:
            print(line)
    return code
