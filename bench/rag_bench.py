"""RAG benchmark: ingestion throughput and search latency, embedded (SQLite + sqlite-vec) and PostgreSQL.

    python bench/rag_bench.py                              # sqlite-vec, 1k and 10k chunks
    python bench/rag_bench.py --sizes 1000 10000 100000 --pg   # also PostgreSQL + pgvector (pgserver)
    python bench/rag_bench.py --dsn postgresql://...       # an existing PostgreSQL with pgvector

Two parts, both through the server's own pieces (corral/stack/rag), in process:
  1. Ingestion on real text: the labelled test corpus's documents, repeated to `--ingest-chunks` chunks
     of 200 MiniLM tokens, embedded by all-MiniLM-L6-v2 in batches of 32 (as the server does) and
     written with `replace_file`. Reports chunks/s embedded, chunks/s indexed, and both together.
  2. Search latency at each size: the store is filled with random unit 384-d vectors (embedding 100k
     chunks for real would take the CPU most of an hour; search cost does not depend on where the
     vectors came from) and synthetic text from a 5,000-word vocabulary, then `--queries` queries per
     mode. Reports p50 / p95 in ms of the backend call (vector: exact KNN; keyword: FTS5 / tsvector;
     hybrid: both lists 50 deep + RRF); the query's own embedding is timed separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corral.stack.rag.backend import StoredChunk, rrf_fuse  # noqa: E402
from corral.stack.rag.ingest import Chunking, chunk_text, tokenizer_for  # noqa: E402
from corral.stack.rag.quality import DEFAULT_CORPUS, minilm  # noqa: E402

DIM = 384
BATCH = 32


def backends(args, tmp: Path):
    from corral.stack.rag.sqlite_vec import SqliteVecBackend

    yield "sqlite-vec", SqliteVecBackend(tmp / "bench.db")
    dsn, server = args.dsn, None
    if args.pg and not dsn:
        import pgserver

        # under the system temp dir, created by pgserver: run as root it starts PostgreSQL as its own
        # user, which cannot enter a private temp dir
        pgdata = Path(tempfile.gettempdir()) / f"corral-bench-pg-{int(time.time())}"
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        dsn = server.get_uri()
    if dsn:
        from corral.stack.rag.pgvector import PgVectorBackend

        yield "pgvector", PgVectorBackend(dsn)
    if server is not None:
        import shutil

        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


def ingest(backend, encode, n_chunks: int) -> dict:
    docs = list(json.loads(DEFAULT_CORPUS.read_text())["documents"].values())
    text, tok = "", tokenizer_for("all-MiniLM-L6-v2")
    chunking = Chunking(200, 0, "static")
    while len(chunk_text(text, tok, chunking)) < n_chunks:
        text += "\n\n".join(f"{d} (copy {len(text)})" for d in docs) + "\n\n"
    t0 = time.perf_counter()
    pieces = chunk_text(text, tok, chunking)[:n_chunks]
    t_chunk = time.perf_counter() - t0
    t0 = time.perf_counter()
    vecs = np.concatenate([encode([p.text for p in pieces[i:i + BATCH]]) for i in range(0, len(pieces), BATCH)])
    t_embed = time.perf_counter() - t0
    chunks = [StoredChunk(chunk_id=f"f:{p.position}", text=p.text, file_id="f", position=p.position) for p in pieces]
    backend.drop_store("vs_ingest")
    backend.create_store("vs_ingest", DIM)
    t0 = time.perf_counter()
    backend.replace_file("vs_ingest", "f", chunks, vecs)
    t_index = time.perf_counter() - t0
    backend.drop_store("vs_ingest")
    n = len(pieces)
    return {"chunks": n, "chunk_per_s": n / t_chunk, "embed_per_s": n / t_embed, "index_per_s": n / t_index,
            "end_to_end_per_s": n / (t_chunk + t_embed + t_index)}


def fill(backend, store: str, n: int, rng) -> None:
    vocab = [f"w{i}" for i in range(5000)]
    backend.drop_store(store)
    backend.create_store(store, DIM)
    step = 10_000
    for start in range(0, n, step):
        m = min(step, n - start)
        v = rng.standard_normal((m, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        words = rng.integers(0, len(vocab), size=(m, 60))
        chunks = [StoredChunk(chunk_id=f"c{start + i}", text=" ".join(vocab[j] for j in words[i]),
                              file_id=f"file{(start + i) // 100}", position=(start + i) % 100) for i in range(m)]
        backend.replace_file(store, f"batch{start}", chunks, v)


def latency(backend, store: str, n_queries: int, rng) -> dict:
    out = {}
    qv = rng.standard_normal((n_queries, DIM)).astype(np.float32)
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    qt = [" ".join(f"w{j}" for j in rng.integers(0, 5000, size=4)) for _ in range(n_queries)]
    calls = {"vector": lambda i: backend.search_vector(store, qv[i], 10, None),
             "keyword": lambda i: backend.search_keyword(store, qt[i], 10, None),
             "hybrid": lambda i: rrf_fuse([backend.search_vector(store, qv[i], 50, None),
                                           backend.search_keyword(store, qt[i], 50, None)], 10)}
    for mode, call in calls.items():
        call(0)  # warm
        times = []
        for i in range(n_queries):
            t0 = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        out[mode] = {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--ingest-chunks", type=int, default=500)
    p.add_argument("--pg", action="store_true", help="also PostgreSQL + pgvector, on a pgserver started here")
    p.add_argument("--dsn", help="also PostgreSQL + pgvector, on this server")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    encode = minilm()
    encode(["warm up"])
    t0 = time.perf_counter()
    for _ in range(20):
        encode(["what is the capital of France?"])
    query_embed_ms = (time.perf_counter() - t0) / 20 * 1000
    print(f"query embedding (MiniLM, one query): {query_embed_ms:.1f} ms")
    results = {"query_embed_ms": query_embed_ms, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, backend in backends(args, Path(tmp)):
            r = results["backends"][name] = {"ingest": ingest(backend, encode, args.ingest_chunks), "search": {}}
            i = r["ingest"]
            print(f"[{name}] ingestion of {i['chunks']} chunks of 200 tokens: chunking {i['chunk_per_s']:.0f}/s, "
                  f"embedding {i['embed_per_s']:.1f}/s, indexing {i['index_per_s']:.0f}/s, "
                  f"end to end {i['end_to_end_per_s']:.1f} chunks/s")
            for n in args.sizes:
                t0 = time.perf_counter()
                fill(backend, "vs_bench", n, rng)
                fill_s = time.perf_counter() - t0
                lat = r["search"][n] = {"fill_chunks_per_s": n / fill_s, **latency(backend, "vs_bench", args.queries, rng)}
                print(f"[{name}] {n:>7} chunks (indexed at {n / fill_s:.0f}/s): " + ", ".join(
                    f"{m} p50 {lat[m]['p50_ms']:.1f} / p95 {lat[m]['p95_ms']:.1f} ms" for m in ("vector", "keyword", "hybrid")))
            backend.drop_store("vs_bench")
            backend.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
