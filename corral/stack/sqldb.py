"""One connection for the server's own stores: a SQLite file (the default) or PostgreSQL (`storage.dsn`).

The stores write their SQL once, in SQLite's dialect, and this class adapts it for PostgreSQL: `?`
placeholders become `%s`, and in the schema `INTEGER PRIMARY KEY AUTOINCREMENT` becomes an identity
column and INTEGER becomes BIGINT. JSON stays TEXT on both; `ON CONFLICT ... DO UPDATE` is the same.

Durability is the same too: SQLite runs in WAL mode with synchronous=FULL, PostgreSQL in autocommit
with synchronous_commit=on, so a write is on disk when it returns. On PostgreSQL the tables live in
their own schema (`storage.schema`, default `corral`), and a broken connection (the database restarted)
is replaced on the next call, as the pgvector backend does. The caller serialises access (its lock).
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class Database:
    def __init__(self, schema: str, *, path: str | Path | None = None, dsn: str | None = None,
                 pg_schema: str = "corral", sqlite_pragmas: tuple[str, ...] = ()):
        self.postgres = dsn is not None
        if self.postgres:
            import psycopg

            if not SCHEMA_NAME.match(pg_schema):
                raise ValueError(f"storage schema {pg_schema!r}: lower-case letters, digits and _ only")
            self.IntegrityError = psycopg.IntegrityError
            self.dsn, self.pg_schema = dsn, pg_schema
            self._conn = self._connect()
            schema = schema.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
            with self._conn.transaction():
                self._conn.execute(schema.replace("INTEGER", "BIGINT"))
        else:
            self.IntegrityError = sqlite3.IntegrityError
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            for pragma in ("journal_mode=WAL", "synchronous=FULL", *sqlite_pragmas):
                self._conn.execute(f"PRAGMA {pragma}")
            self._conn.executescript(schema)

    def _connect(self):
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.pg_schema}")
        conn.execute(f"SET search_path TO {self.pg_schema}")
        conn.execute("SET synchronous_commit TO on")
        return conn

    @property
    def conn(self):
        if self.postgres and self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def execute(self, sql: str, args: tuple | list = ()):
        """A cursor (fetchone, fetchall, rowcount) on either backend."""
        return self.conn.execute(self._sql(sql), args)

    def executemany(self, sql: str, rows: list) -> None:
        if self.postgres:
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            self._conn.executemany(sql, rows)

    @contextmanager
    def transaction(self):
        if self.postgres:
            with self.conn.transaction():
                yield
            return
        self._conn.execute("BEGIN")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()
