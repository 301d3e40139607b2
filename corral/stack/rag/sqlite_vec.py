"""The embedded vector_io backend (`inline::sqlite-vec`): one SQLite file, no server.

Tables:
  chunks        one row per chunk: store, chunk id, file id, position, text, metadata and attributes (JSON)
  chunks_fts    FTS5 over the text (porter stemming), rowid = chunks.id: keyword search by bm25()
  vec_d<dim>    a sqlite-vec `vec0` table per embedding width, partitioned by store, rowid = chunks.id:
                exact (brute-force) cosine KNN

Filters compile to an `EXISTS (... json_each(attributes) ...)` condition on the chunk rows, and the KNN
and the FTS query both take `rowid IN (the chunks that pass)`, so filtering happens before the top k is
cut, never after (a filter never shrinks the result below what matches).

The stdlib `sqlite3` of some Python builds cannot load extensions, so this uses `pysqlite3` (the same
DB-API with a current SQLite). WAL with synchronous=FULL: a committed transaction survives kill -9.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from corral.stack.rag.api import Comparison, Compound, Filter
from corral.stack.rag.backend import Hit, StoredChunk, keyword_terms

SCHEMA = """
CREATE TABLE IF NOT EXISTS stores (id TEXT PRIMARY KEY, dimension INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    store_id TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    file_id TEXT,
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    attributes TEXT NOT NULL,
    UNIQUE (store_id, chunk_id)
);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks (store_id, file_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, tokenize = 'porter unicode61');
"""

MAX_K = 4096  # sqlite-vec's limit on k


def connect(path: Path):
    import sqlite_vec
    from pysqlite3 import dbapi2 as sqlite3

    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.enable_load_extension(True)
    sqlite_vec.load(db)
    db.enable_load_extension(False)
    return db


class SqliteVecBackend:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect(self.path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._dims = dict(self.db.execute("SELECT id, dimension FROM stores").fetchall())

    def describe(self) -> dict:
        return {"db_path": str(self.path)}

    # -- stores -----------------------------------------------------------------------------------
    def create_store(self, store_id: str, dimension: int) -> None:
        with self._tx():
            self.db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS vec_d{int(dimension)} USING vec0("
                            f"store_id TEXT PARTITION KEY, embedding FLOAT[{int(dimension)}] distance_metric=cosine)")
            self.db.execute("INSERT OR REPLACE INTO stores (id, dimension) VALUES (?, ?)", (store_id, dimension))
        self._dims[store_id] = int(dimension)

    def drop_store(self, store_id: str) -> None:
        if store_id not in self._dims:
            return
        with self._tx():
            self._delete_where("c.store_id = ?", (store_id,), store_id)
            self.db.execute("DELETE FROM stores WHERE id = ?", (store_id,))
        del self._dims[store_id]

    # -- writes -----------------------------------------------------------------------------------
    def replace_file(self, store_id: str, file_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        with self._tx():
            self._delete_where("c.store_id = ? AND c.file_id = ?", (store_id, file_id), store_id)
            self._insert(store_id, chunks, vectors)

    def delete_file(self, store_id: str, file_id: str) -> None:
        if store_id in self._dims:
            with self._tx():
                self._delete_where("c.store_id = ? AND c.file_id = ?", (store_id, file_id), store_id)

    def upsert_chunks(self, store_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        with self._tx():
            for c in chunks:
                self._delete_where("c.store_id = ? AND c.chunk_id = ?", (store_id, c.chunk_id), store_id)
            self._insert(store_id, chunks, vectors)

    def set_attributes(self, store_id: str, file_id: str, attributes: dict[str, Any]) -> None:
        with self._tx():
            self.db.execute("UPDATE chunks SET attributes = ? WHERE store_id = ? AND file_id = ?",
                            (json.dumps(attributes), store_id, file_id))

    def _insert(self, store_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        table = self._vec_table(store_id)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for c, v in zip(chunks, vectors):
            cur = self.db.execute(
                "INSERT INTO chunks (store_id, chunk_id, file_id, position, text, metadata, attributes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (store_id, c.chunk_id, c.file_id, c.position, c.text, json.dumps(c.metadata), json.dumps(c.attributes)))
            rowid = cur.lastrowid
            self.db.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (rowid, c.text))
            self.db.execute(f"INSERT INTO {table} (rowid, store_id, embedding) VALUES (?, ?, ?)",
                            (rowid, store_id, v.tobytes()))

    def _delete_where(self, where: str, args: tuple, store_id: str) -> None:
        ids = [r[0] for r in self.db.execute(f"SELECT c.id FROM chunks c WHERE {where}", args)]
        if not ids:
            return
        table = self._vec_table(store_id)
        for i in range(0, len(ids), 500):
            batch = ids[i:i + 500]
            marks = ",".join("?" * len(batch))
            self.db.execute(f"DELETE FROM chunks WHERE id IN ({marks})", batch)
            self.db.execute(f"DELETE FROM chunks_fts WHERE rowid IN ({marks})", batch)
            self.db.execute(f"DELETE FROM {table} WHERE rowid IN ({marks})", batch)

    # -- reads ------------------------------------------------------------------------------------
    def file_chunks(self, store_id: str, file_id: str) -> list[StoredChunk]:
        rows = self._rows("SELECT * FROM chunks c WHERE store_id = ? AND file_id = ? ORDER BY position",
                          (store_id, file_id))
        return [self._chunk(r) for r in rows]

    def count(self, store_id: str, file_id: str | None = None) -> int:
        if file_id is None:
            return self.db.execute("SELECT count(*) FROM chunks WHERE store_id = ?", (store_id,)).fetchone()[0]
        return self.db.execute("SELECT count(*) FROM chunks WHERE store_id = ? AND file_id = ?",
                               (store_id, file_id)).fetchone()[0]

    def search_vector(self, store_id: str, vector: np.ndarray, k: int, flt: Filter | None,
                      with_embeddings: bool = False) -> list[Hit]:
        if store_id not in self._dims:
            return []
        sql = (f"SELECT v.rowid, v.distance FROM {self._vec_table(store_id)} v "
               "WHERE v.embedding MATCH ? AND k = ? AND v.store_id = ?")
        args: list = [np.asarray(vector, dtype=np.float32).tobytes(), min(k, MAX_K), store_id]
        if flt is not None:
            cond, cargs = compile_filter(flt)
            sql += f" AND v.rowid IN (SELECT c.id FROM chunks c WHERE c.store_id = ? AND {cond})"
            args += [store_id, *cargs]
        hits = self.db.execute(sql, args).fetchall()
        return self._hits(store_id, [(rowid, 1.0 - dist) for rowid, dist in hits], with_embeddings)

    def search_keyword(self, store_id: str, query: str, k: int, flt: Filter | None,
                       with_embeddings: bool = False) -> list[Hit]:
        terms = keyword_terms(query)
        if not terms or store_id not in self._dims:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        where, args = "c.store_id = ?", [store_id]
        if flt is not None:
            cond, cargs = compile_filter(flt)
            where += f" AND {cond}"
            args += cargs
        # The FTS match runs once, materialized, and drives the join (CROSS JOIN fixes the order): the
        # planner otherwise re-runs the MATCH for every chunk of the store (400 ms at 10k chunks, not 2).
        rows = self.db.execute(
            "WITH hits AS MATERIALIZED (SELECT rowid AS id, bm25(chunks_fts) AS r FROM chunks_fts "
            "WHERE chunks_fts MATCH ?) "
            f"SELECT h.id, h.r FROM hits h CROSS JOIN chunks c ON c.id = h.id WHERE {where} ORDER BY h.r LIMIT ?",
            [match, *args, k]).fetchall()
        # bm25() is negative, lower is better: rank = -bm25, mapped to rank / (1 + rank)
        return self._hits(store_id, [(rowid, max(-r, 0.0) / (1.0 + max(-r, 0.0))) for rowid, r in rows],
                          with_embeddings)

    def _hits(self, store_id: str, scored: list[tuple[int, float]], with_embeddings: bool) -> list[Hit]:
        if not scored:
            return []
        ids = [rowid for rowid, _ in scored]
        marks = ",".join("?" * len(ids))
        rows = {r["id"]: r for r in self._rows(f"SELECT * FROM chunks c WHERE id IN ({marks})", ids)}
        vecs = {}
        if with_embeddings:
            vecs = dict(self.db.execute(f"SELECT rowid, embedding FROM {self._vec_table(store_id)} "
                                        f"WHERE rowid IN ({marks})", ids).fetchall())
        hits = []
        for rowid, score in scored:
            chunk = self._chunk(rows[rowid])
            if with_embeddings:
                chunk.embedding = np.frombuffer(vecs[rowid], dtype=np.float32).tolist()
            hits.append(Hit(chunk, float(score)))
        return hits

    def _rows(self, sql: str, args) -> list[dict]:
        cur = self.db.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    @staticmethod
    def _chunk(r: dict) -> StoredChunk:
        return StoredChunk(chunk_id=r["chunk_id"], text=r["text"], file_id=r["file_id"], position=r["position"],
                           metadata=json.loads(r["metadata"]), attributes=json.loads(r["attributes"]))

    # -- plumbing ---------------------------------------------------------------------------------
    def _vec_table(self, store_id: str) -> str:
        return f"vec_d{self._dims[store_id]}"

    def _tx(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()


class _Transaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


# ---------------------------------------------------------------------------------------------
# Filters -> SQL over `chunks c`


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
    conds, args = [], [f.key]
    for v in values:
        if isinstance(v, bool):
            conds.append(f"j.type = '{'true' if v else 'false'}'")
        elif isinstance(v, (int, float)):
            conds.append(f"(j.type IN ('integer', 'real') AND j.value {op} ?)")
            args.append(v)
        else:
            conds.append("(j.type = 'text' AND j.value = ?)")
            args.append(v)
    return f"EXISTS (SELECT 1 FROM json_each(c.attributes) j WHERE j.key = ? AND ({' OR '.join(conds)}))", args
