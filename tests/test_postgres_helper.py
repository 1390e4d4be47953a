"""The tests' own PostgreSQL (helpers/postgres.py): made, reached, crashed, restarted, removed.

The ingest tests rely on it: a server of their own on a free port (never the machine's 5432), a
fresh database per test, and a crash (`pg_ctl stop -m immediate`) that keeps what was committed.
"""

from __future__ import annotations

import psycopg
import pytest
from helpers.postgres import PostgresServer

pytestmark = pytest.mark.integration


def test_own_server_started_crashed_restarted_and_removed() -> None:
    server = PostgresServer()
    try:
        server.start()
        assert server.port != 5432
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            assert conn.execute("SHOW port").fetchone() == (str(server.port),)
            version = conn.execute("SHOW server_version_num").fetchone()
            assert version is not None and int(version[0]) >= 150000
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (1), (2)")
        with psycopg.connect(server.socket_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (2,)

        held = psycopg.connect(server.dsn, autocommit=True)
        server.stop(mode="immediate")
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
        held.close()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn, connect_timeout=2)

        server.start()
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT sum(n) FROM kept").fetchone() == (3,)
    finally:
        server.close()
    assert not server.directory.exists()


def test_each_test_has_a_fresh_database(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        database = conn.execute("SELECT current_database()").fetchone()
        assert database is not None and database[0].startswith("t")
    assert f"port={postgres_server.port}" in postgres_dsn
