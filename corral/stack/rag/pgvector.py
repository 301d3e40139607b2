"""The PostgreSQL vector_io backend (`remote::pgvector`): pgvector for vectors, PostgreSQL's own full-text search.

Any PostgreSQL with the `vector` extension, reached by a DSN (psycopg 3). One table holds every store's
chunks; `embedding` is an unsized `vector`, so stores of different widths share it. Vector search is
exact (`ORDER BY embedding <=> q`, cosine distance) with the filter in the same WHERE clause, so it is
applied before the top k. Keyword search ranks `to_tsvector('english', text)` (a stored generated
column with a GIN index) against the query's words OR-ed, by `ts_rank_cd(..., 32)`, which is
rank / (rank + 1): the same [0, 1) scale as the SQLite backend's mapped bm25().
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from corral.stack.rag.api import Comparison, Compound, Filter
from corral.stack.rag.backend import Hit, StoredChunk, keyword_terms

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS corral_vector_stores (id TEXT PRIMARY KEY, dimension INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS corral_chunks (
    id BIGSERIAL PRIMARY KEY,
    store_id TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    file_id TEXT,
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata JSONB NOT NULL,
    attributes JSONB NOT NULL,
    embedding vector NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (store_id, chunk_id)
);
-- keep vectors in the row: TOAST would move them out of line (rows with text pass 2 kB), and an exact
-- scan then pays a detoast per row (3-5x slower at 10k chunks)
ALTER TABLE corral_chunks ALTER COLUMN embedding SET STORAGE MAIN;
CREATE INDEX IF NOT EXISTS corral_chunks_file ON corral_chunks (store_id, file_id);
CREATE INDEX IF NOT EXISTS corral_chunks_tsv ON corral_chunks USING gin (tsv);
"""

COLUMNS = "c.chunk_id, c.file_id, c.position, c.text, c.metadata, c.attributes"


def vector_literal(v) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in v) + "]"


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced (for /v1/providers and logs)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a DSN we cannot parse is shown as nothing at all
        return "********"
    if parts.get("password"):
        parts["password"] = "********"
    return make_conninfo(**parts)


class PgVectorBackend:
    def __init__(self, dsn: str):
        self.dsn = dsn
        self._db = self._connect()
        with self.db.transaction():
            self.db.execute(SCHEMA)

    def _connect(self):
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    @property
    def db(self):
        """The connection; a broken one (PostgreSQL restarted, network cut) is replaced on the next call."""
        if self._db.broken:
            self._db = self._connect()
        return self._db

    def describe(self) -> dict:
        return {"dsn": redact_dsn(self.dsn)}

    # -- stores -----------------------------------------------------------------------------------
    def create_store(self, store_id: str, dimension: int) -> None:
        self.db.execute("INSERT INTO corral_vector_stores (id, dimension) VALUES (%s, %s) "
                        "ON CONFLICT (id) DO UPDATE SET dimension = EXCLUDED.dimension", (store_id, dimension))

    def drop_store(self, store_id: str) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM corral_chunks WHERE store_id = %s", (store_id,))
            self.db.execute("DELETE FROM corral_vector_stores WHERE id = %s", (store_id,))

    # -- writes -----------------------------------------------------------------------------------
    def replace_file(self, store_id: str, file_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM corral_chunks WHERE store_id = %s AND file_id = %s", (store_id, file_id))
            self._insert(store_id, chunks, vectors)

    def delete_file(self, store_id: str, file_id: str) -> None:
        self.db.execute("DELETE FROM corral_chunks WHERE store_id = %s AND file_id = %s", (store_id, file_id))

    def upsert_chunks(self, store_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM corral_chunks WHERE store_id = %s AND chunk_id = ANY(%s)",
                            (store_id, [c.chunk_id for c in chunks]))
            self._insert(store_id, chunks, vectors)

    def set_attributes(self, store_id: str, file_id: str, attributes: dict[str, Any]) -> None:
        self.db.execute("UPDATE corral_chunks SET attributes = %s::jsonb WHERE store_id = %s AND file_id = %s",
                        (json.dumps(attributes), store_id, file_id))

    def _insert(self, store_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        # COPY: one round trip for the whole file (several times faster than row INSERTs); in text
        # format PostgreSQL parses the vector and JSON literals itself
        with self.db.cursor() as cur, cur.copy(
                "COPY corral_chunks (store_id, chunk_id, file_id, position, text, metadata, attributes, embedding) "
                "FROM STDIN") as copy:
            for c, v in zip(chunks, vectors):
                copy.write_row((store_id, c.chunk_id, c.file_id, c.position, c.text, json.dumps(c.metadata),
                                json.dumps(c.attributes), vector_literal(v)))

    # -- reads ------------------------------------------------------------------------------------
    def file_chunks(self, store_id: str, file_id: str) -> list[StoredChunk]:
        rows = self.db.execute(f"SELECT {COLUMNS} FROM corral_chunks c WHERE store_id = %s AND file_id = %s "
                               "ORDER BY position", (store_id, file_id)).fetchall()
        return [self._chunk(r) for r in rows]

    def count(self, store_id: str, file_id: str | None = None) -> int:
        if file_id is None:
            return self.db.execute("SELECT count(*) FROM corral_chunks WHERE store_id = %s", (store_id,)).fetchone()[0]
        return self.db.execute("SELECT count(*) FROM corral_chunks WHERE store_id = %s AND file_id = %s",
                               (store_id, file_id)).fetchone()[0]

    def search_vector(self, store_id: str, vector: np.ndarray, k: int, flt: Filter | None,
                      with_embeddings: bool = False) -> list[Hit]:
        cond, cargs = compile_filter(flt) if flt is not None else ("TRUE", [])
        q = vector_literal(vector)
        extra = ", c.embedding::text" if with_embeddings else ""
        rows = self.db.execute(
            f"SELECT {COLUMNS}, 1 - (c.embedding <=> %s::vector) AS score{extra} FROM corral_chunks c "
            f"WHERE c.store_id = %s AND {cond} ORDER BY score DESC, c.id LIMIT %s",
            (q, store_id, *cargs, k)).fetchall()
        return [self._hit(r, with_embeddings) for r in rows]

    def search_keyword(self, store_id: str, query: str, k: int, flt: Filter | None,
                       with_embeddings: bool = False) -> list[Hit]:
        terms = keyword_terms(query)
        if not terms:
            return []
        cond, cargs = compile_filter(flt) if flt is not None else ("TRUE", [])
        extra = ", c.embedding::text" if with_embeddings else ""
        rows = self.db.execute(
            f"SELECT {COLUMNS}, ts_rank_cd(c.tsv, q, 32) AS score{extra} "
            f"FROM corral_chunks c, to_tsquery('english', %s) q "
            f"WHERE c.store_id = %s AND c.tsv @@ q AND {cond} ORDER BY score DESC, c.id LIMIT %s",
            (" | ".join(terms), store_id, *cargs, k)).fetchall()
        return [self._hit(r, with_embeddings) for r in rows]

    @staticmethod
    def _chunk(r) -> StoredChunk:
        chunk_id, file_id, position, text, metadata, attributes = r[:6]
        return StoredChunk(chunk_id=chunk_id, text=text, file_id=file_id, position=position,
                           metadata=metadata, attributes=attributes)

    def _hit(self, r, with_embeddings: bool) -> Hit:
        chunk = self._chunk(r)
        if with_embeddings:
            chunk.embedding = json.loads(r[7])
        return Hit(chunk, float(r[6]))

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------------------------------------
# Filters -> SQL over `corral_chunks c` (each leaf is TRUE or FALSE, never NULL, so NOT works)


def compile_filter(f: Filter) -> tuple[str, list]:
    if isinstance(f, Compound):
        parts = [compile_filter(sub) for sub in f.filters]
        joiner = " AND " if f.type == "and" else " OR "
        return "(" + joiner.join(p for p, _ in parts) + ")", [a for _, args in parts for a in args]
    if f.type in ("ne", "nin"):
        sql, args = compile_filter(Comparison(key=f.key, type="eq" if f.type == "ne" else "in", value=f.value))
        return f"NOT {sql}", args
    values = f.value if f.type == "in" else [f.value]
    op = {"eq": "=", "in": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[f.type]
    conds, args = [], []
    for v in values:
        if isinstance(v, bool):
            conds.append("(c.attributes -> %s) = %s::jsonb")
            args += [f.key, "true" if v else "false"]
        elif isinstance(v, (int, float)):
            # CASE, not AND: PostgreSQL may evaluate AND's operands in any order, and a cast of a
            # string attribute to float8 would fail
            conds.append(f"CASE WHEN jsonb_typeof(c.attributes -> %s) = 'number' "
                         f"THEN (c.attributes ->> %s)::float8 {op} %s ELSE FALSE END")
            args += [f.key, f.key, float(v)]
        else:
            conds.append("(c.attributes -> %s) = to_jsonb(%s::text)")
            args += [f.key, v]
    return "COALESCE((" + " OR ".join(conds) + "), FALSE)", args
