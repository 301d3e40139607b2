"""Retrieval quality: recall@k of vector, keyword and hybrid search on a labelled corpus.

    python -m corral.stack.rag.quality                       # the corpus that ships in the tests, k = 1, 3, 5
    python -m corral.stack.rag.quality --dsn postgresql://... # the same on PostgreSQL + pgvector

The corpus is JSON: {"documents": {name: text}, "queries": [{"query", "relevant": [names]}]}.
Documents go through the server's own pipeline pieces (parsing, chunking by MiniLM tokens, the
backend, reciprocal-rank fusion); a query counts as recalled at k when a relevant document owns one
of the top k distinct documents returned.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from corral.stack.rag.backend import StoredChunk, rrf_fuse
from corral.stack.rag.ingest import Chunking, chunk_text, extract_text, tokenizer_for

DEFAULT_CORPUS = Path(__file__).resolve().parents[3] / "tests" / "stack" / "data" / "rag" / "labelled.json"
MODES = ("vector", "keyword", "hybrid")
MODEL = "all-MiniLM-L6-v2"


def minilm():
    """MiniLM's encode (L2-normalized float32), from the offline model package, as the server loads it."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from corral.stack.providers.embeddings import PACKAGES, model_dir

    st = SentenceTransformer(str(model_dir(PACKAGES[MODEL][0])), device="cpu")
    return lambda texts: st.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=64).astype(np.float32)


def index_corpus(backend, store_id: str, documents: dict[str, str], encode) -> None:
    tok = tokenizer_for(MODEL)
    backend.create_store(store_id, 384)
    for name, text in documents.items():
        pieces = chunk_text(extract_text(text.encode(), name), tok, Chunking())
        chunks = [StoredChunk(chunk_id=f"{name}:{p.position}", text=p.text, file_id=name, position=p.position)
                  for p in pieces]
        backend.replace_file(store_id, name, chunks, encode([c.text for c in chunks]))


def search(backend, store_id: str, query: str, qvec, mode: str, k: int, depth: int = 50):
    if mode == "vector":
        return backend.search_vector(store_id, qvec, k, None)
    if mode == "keyword":
        return backend.search_keyword(store_id, query, k, None)
    return rrf_fuse([backend.search_vector(store_id, qvec, depth, None),
                     backend.search_keyword(store_id, query, depth, None)], k)


def recall_at(backend, store_id: str, queries: list[dict], encode, ks=(1, 3, 5)) -> dict[str, dict[int, float]]:
    qvecs = encode([q["query"] for q in queries])
    out = {}
    for mode in MODES:
        hits_at = {k: 0 for k in ks}
        for q, qv in zip(queries, qvecs):
            docs: list[str] = []
            for h in search(backend, store_id, q["query"], qv, mode, 50):
                if h.chunk.file_id not in docs:
                    docs.append(h.chunk.file_id)
            for k in ks:
                hits_at[k] += any(d in q["relevant"] for d in docs[:k])
        out[mode] = {k: hits_at[k] / len(queries) for k in ks}
    return out


def evaluate(corpus_path: Path = DEFAULT_CORPUS, dsn: str | None = None, ks=(1, 3, 5)) -> dict:
    corpus = json.loads(Path(corpus_path).read_text())
    encode = minilm()
    with tempfile.TemporaryDirectory() as tmp:
        if dsn:
            from corral.stack.rag.pgvector import PgVectorBackend

            backend = PgVectorBackend(dsn)
        else:
            from corral.stack.rag.sqlite_vec import SqliteVecBackend

            backend = SqliteVecBackend(Path(tmp) / "quality.db")
        store = "vs_quality"
        backend.drop_store(store)
        try:
            index_corpus(backend, store, corpus["documents"], encode)
            return recall_at(backend, store, corpus["queries"], encode, ks)
        finally:
            backend.drop_store(store)
            backend.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--dsn", help="evaluate on PostgreSQL + pgvector instead of the embedded SQLite store")
    p.add_argument("-k", type=int, nargs="+", default=[1, 3, 5])
    args = p.parse_args(argv)
    n = len(json.loads(Path(args.corpus).read_text())["queries"])
    result = evaluate(Path(args.corpus), args.dsn, tuple(args.k))
    print(f"recall@k on {n} labelled queries ({'pgvector' if args.dsn else 'sqlite-vec'}, {MODEL}):")
    print("mode      " + "".join(f"  @{k:<4}" for k in args.k))
    for mode, by_k in result.items():
        print(f"{mode:<10}" + "".join(f"  {by_k[k]:.2f} " for k in args.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
