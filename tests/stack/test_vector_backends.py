"""The two vector_io backends against the same expectations: SQLite + sqlite-vec and PostgreSQL + pgvector.

Filters are checked against `matches` (the Python statement of their meaning) and against hand-written
expected sets; vector search against numpy's exact cosine ranking; keyword search and the atomic
replace of a file's chunks by what they must return.
"""

from __future__ import annotations

import numpy as np
import pytest

from corral.stack.rag.api import matches, parse_filter
from corral.stack.rag.backend import StoredChunk, rrf_fuse, Hit

DIM = 8

# one chunk per "file"; the attributes exercise every type and a missing key
ATTRS = {
    "a": {"year": 2021, "lang": "en", "draft": False, "score": 0.5},
    "b": {"year": 2023, "lang": "fr", "draft": True},
    "c": {"year": 2024.5, "lang": "en", "draft": False, "score": 2},
    "d": {"lang": "de", "year": "2023"},  # a string year: matches no numeric comparison
    "e": {},
}
TEXTS = {
    "a": "the quick brown fox jumps over the lazy dog",
    "b": "postgres full text search ranks lexemes",
    "c": "sqlite fts5 ranks documents by bm25",
    "d": "ein schneller brauner fuchs",
    "e": "vectors and keywords fused by reciprocal rank",
}


@pytest.fixture(params=["sqlite-vec", "pgvector"])
def backend(request, tmp_path):
    if request.param == "sqlite-vec":
        from corral.stack.rag.sqlite_vec import SqliteVecBackend

        b = SqliteVecBackend(tmp_path / "vec.db")
    else:
        from corral.stack.rag.pgvector import PgVectorBackend

        b = PgVectorBackend(request.getfixturevalue("pg_dsn"))
    store = f"vs_test_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    b.drop_store(store)
    b.create_store(store, DIM)
    rng = np.random.default_rng(0)
    vecs = {}
    for fid in ATTRS:
        v = rng.standard_normal(DIM).astype(np.float32)
        vecs[fid] = v / np.linalg.norm(v)
        b.replace_file(store, fid, [StoredChunk(chunk_id=f"{fid}:0", text=TEXTS[fid], file_id=fid,
                                                attributes=ATTRS[fid])], vecs[fid][None])
    b.store, b.vecs = store, vecs
    yield b
    b.drop_store(store)
    b.close()


FILTERS = [
    ({"key": "lang", "type": "eq", "value": "en"}, {"a", "c"}),
    ({"key": "lang", "type": "ne", "value": "en"}, {"b", "d", "e"}),
    ({"key": "year", "type": "gt", "value": 2023}, {"c"}),
    ({"key": "year", "type": "gte", "value": 2023}, {"b", "c"}),
    ({"key": "year", "type": "lt", "value": 2023}, {"a"}),
    ({"key": "year", "type": "lte", "value": 2023}, {"a", "b"}),
    ({"key": "year", "type": "eq", "value": 2023}, {"b"}),  # not d: its year is a string
    ({"key": "year", "type": "eq", "value": "2023"}, {"d"}),
    ({"key": "draft", "type": "eq", "value": True}, {"b"}),
    ({"key": "draft", "type": "eq", "value": False}, {"a", "c"}),
    ({"key": "draft", "type": "ne", "value": True}, {"a", "c", "d", "e"}),
    ({"key": "lang", "type": "in", "value": ["fr", "de"]}, {"b", "d"}),
    ({"key": "lang", "type": "nin", "value": ["fr", "de"]}, {"a", "c", "e"}),
    ({"key": "score", "type": "in", "value": [2, 7]}, {"c"}),
    ({"type": "and", "filters": [{"key": "lang", "type": "eq", "value": "en"},
                                 {"key": "year", "type": "gte", "value": 2022}]}, {"c"}),
    ({"type": "or", "filters": [{"key": "lang", "type": "eq", "value": "de"},
                                {"type": "and", "filters": [{"key": "draft", "type": "eq", "value": True},
                                                            {"key": "year", "type": "lt", "value": 2024}]}]},
     {"b", "d"}),
]


@pytest.mark.parametrize("raw,expected", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_filters_match_their_reference(backend, raw, expected):
    flt = parse_filter(raw)
    assert {f for f, a in ATTRS.items() if matches(flt, a)} == expected  # the reference agrees with the hand set
    q = backend.vecs["a"]
    by_vector = {h.chunk.file_id for h in backend.search_vector(backend.store, q, 50, flt)}
    assert by_vector == expected
    by_keyword = {h.chunk.file_id for h in backend.search_keyword(backend.store, " ".join(TEXTS.values()), 50, flt)}
    assert by_keyword == expected


def test_vector_search_is_exact_cosine(backend):
    q = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    hits = backend.search_vector(backend.store, q, 3, None)
    want = sorted(ATTRS, key=lambda f: -float(backend.vecs[f] @ q))[:3]
    assert [h.chunk.file_id for h in hits] == want
    for h in hits:
        assert h.score == pytest.approx(float(backend.vecs[h.chunk.file_id] @ q), abs=1e-4)


def test_keyword_search_ranks_matching_text(backend):
    hits = backend.search_keyword(backend.store, "bm25 ranking in sqlite", 5, None)
    assert hits[0].chunk.file_id == "c"
    assert {h.chunk.file_id for h in hits} == {"b", "c", "e"}  # "ranks", "rank": stemmed like "ranking"
    assert all(0 <= h.score < 1 for h in hits)
    assert backend.search_keyword(backend.store, "zebra", 5, None) == []
    assert backend.search_keyword(backend.store, "!!! ???", 5, None) == []  # no words: no query at all


def test_replace_file_swaps_all_chunks_and_delete_removes_them(backend):
    s = backend.store
    new = [StoredChunk(chunk_id=f"a:{i}", text=f"replacement chunk {i}", file_id="a", position=i,
                       attributes={"v": 2}) for i in range(3)]
    backend.replace_file(s, "a", new, np.tile(backend.vecs["a"], (3, 1)))
    assert [c.text for c in backend.file_chunks(s, "a")] == [c.text for c in new]
    assert backend.count(s) == 7
    backend.set_attributes(s, "a", {"v": 3})
    assert all(c.attributes == {"v": 3} for c in backend.file_chunks(s, "a"))
    backend.delete_file(s, "a")
    assert backend.file_chunks(s, "a") == [] and backend.count(s) == 4
    assert not backend.search_keyword(backend.store, "replacement", 5, None)


def test_a_failed_replace_leaves_the_old_chunks(backend):
    s = backend.store
    bad = [StoredChunk(chunk_id="b:0", text="new", file_id="b"), StoredChunk(chunk_id="b:0", text="dup", file_id="b")]
    with pytest.raises(Exception):  # the duplicate chunk id fails the transaction half way
        backend.replace_file(s, "b", bad, np.tile(backend.vecs["b"], (2, 1)))
    assert [c.text for c in backend.file_chunks(s, "b")] == [TEXTS["b"]]


def test_upsert_by_chunk_id_and_embeddings_come_back(backend):
    s = backend.store
    v = backend.vecs["e"]
    backend.upsert_chunks(s, [StoredChunk(chunk_id="x1", text="inserted through vector-io", metadata={"m": 1})], v[None])
    backend.upsert_chunks(s, [StoredChunk(chunk_id="x1", text="inserted again", metadata={"m": 2})], v[None])
    hits = backend.search_vector(s, v, 10, None, with_embeddings=True)
    x = [h for h in hits if h.chunk.chunk_id == "x1"]
    assert len(x) == 1 and x[0].chunk.text == "inserted again" and x[0].chunk.metadata == {"m": 2}
    assert np.allclose(x[0].chunk.embedding, v, atol=1e-5)


def test_stores_do_not_see_each_other(backend):
    other = backend.store + "_other"
    backend.create_store(other, DIM)
    try:
        assert backend.search_vector(other, backend.vecs["a"], 10, None) == []
        assert backend.search_keyword(other, "fox", 10, None) == []
    finally:
        backend.drop_store(other)


def test_rrf_scales_a_double_first_to_one():
    a, b, c = (StoredChunk(chunk_id=i, text=i) for i in "abc")
    fused = rrf_fuse([[Hit(a, 0.9), Hit(b, 0.5)], [Hit(a, 0.3), Hit(c, 0.2)]], k=3)
    assert [h.chunk.chunk_id for h in fused] == ["a", "b", "c"]
    assert fused[0].score == pytest.approx(1.0)
    assert fused[1].score == pytest.approx(fused[2].score)  # second in one list each


def test_pgvector_reconnects_after_the_connection_breaks(pg_dsn):
    import psycopg

    from corral.stack.rag.pgvector import PgVectorBackend

    b = PgVectorBackend(pg_dsn)
    try:
        pid = b.db.info.backend_pid
        with psycopg.connect(pg_dsn, autocommit=True) as admin:  # what a PostgreSQL restart does to a session
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            b.count("vs_any")  # the call in flight fails (a 500 to its client) ...
        assert b.count("vs_any") == 0  # ... the next one has a new connection
        assert b.db.info.backend_pid != pid
    finally:
        b.close()
